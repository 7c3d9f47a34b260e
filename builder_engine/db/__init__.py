"""SQL storage: SQLModel tables, engines and Alembic migrations."""
