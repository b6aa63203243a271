"""Using a trained model: KV-cache generation, MCQA evaluation, the chat app."""
