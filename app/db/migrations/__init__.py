"""Alembic migrations (env.py, versions/), shipped inside the package so an installed wheel can migrate."""
