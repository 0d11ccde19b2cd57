"""ULMRec, HuggingFace-native."""
__version__ = "0.4.0"
