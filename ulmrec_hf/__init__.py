"""ULMRec, HuggingFace-native."""
__version__ = "0.2.0"
