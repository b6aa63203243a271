"""The one error type of the retrieval stage."""

from qlora_jax.errors import UserError


class RagError(UserError):
    """A corpus, upload, index or query that cannot be used; the message names the file, line
    or setting and says what to do. Raised before anything is changed: an index stays as it was."""
