"""The store: SQLite or PostgreSQL, through SQLAlchemy. `schema` (tables), `records` (what it
hands out), `connection` (URLs, pragmas, error readers), `catalog` (reads), `writes` (`Store`:
opening, migrations, every write; only the library uses it), `textindex`, `migrations`, `backup`."""
