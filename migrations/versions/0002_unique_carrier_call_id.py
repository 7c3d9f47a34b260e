"""unique carrier call id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("call", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_call_carrier_call_id"))
        batch_op.create_index(
            batch_op.f("ix_call_carrier_call_id"), ["carrier_call_id"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("call", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_call_carrier_call_id"))
        batch_op.create_index(
            batch_op.f("ix_call_carrier_call_id"), ["carrier_call_id"], unique=False
        )
