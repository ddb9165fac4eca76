"""OneRec offline pipeline and model: data, semantic-ID tokenizer, embeddings."""

__version__ = "0.1.0"
