"""jobs.verdict holds "inconclusive" (12 characters) beside "pass" and "fail"

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 04:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("verdict", existing_type=sa.String(length=8), type_=sa.String(length=16))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("verdict", existing_type=sa.String(length=16), type_=sa.String(length=8))
