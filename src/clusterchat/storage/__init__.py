"""Storage: the SQL schema, its migrations, and one store per area (SQLAlchemy Core only)."""
