"""l3zh-local: Llama-3 Chinese chat models from Hugging Face weights to a laptop."""

__version__ = "0.1.0"
