"""ULMRec, HuggingFace-native."""
__version__ = "0.1.0"
