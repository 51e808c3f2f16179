"""The application layer: command lines, the demo job, demo training, model loading,
figures and output folders. Imports the methods, the evaluation and convert.
"""
