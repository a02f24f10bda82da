"""Alembic environment: the engine comes from ``engine.schema.alembic_config``
(or from ``-x url=...`` on the alembic command line when authoring revisions)."""
from alembic import context
from sqlalchemy import create_engine

import engine.models  # noqa: F401 - registers the tables
from engine.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///alembic-authoring.db")
        engine = make_engine(url) if url.startswith("sqlite") else create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
