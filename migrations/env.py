"""Alembic environment: refcount passes its open connection in `config.attributes`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from refcount.db.tables import metadata

config = context.config
target_metadata = metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        transaction_per_migration=True,
        compare_server_default=True,
    )
    # Several sidecars may start at once against one PostgreSQL database: take turns.
    if connection.dialect.name == "postgresql":  # type: ignore[attr-defined]
        connection.execute(text("SELECT pg_advisory_xact_lock(7215000001)"))  # type: ignore[attr-defined]
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()  # the `alembic` command line: leave no connection open


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
