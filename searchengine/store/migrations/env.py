"""Alembic's environment: the connection `searchengine.store.migrations.config` hands in."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=False)
context.run_migrations()
