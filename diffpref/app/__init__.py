"""The rating app's server side: ``RatingStore``, the SQLite store of users, images, pairs and ratings."""

from diffpref.app.store import NotFoundError, RatingConflictError, RatingStore

__all__ = ["NotFoundError", "RatingConflictError", "RatingStore"]
