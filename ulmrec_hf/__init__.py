"""ULMRec, HuggingFace-native."""
__version__ = "0.3.0"
