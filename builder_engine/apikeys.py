"""API keys: generated once, stored only as a SHA-256 hash, revocable."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlmodel import Session, select

from builder_engine.config import Settings
from builder_engine.db.models import ApiKey, Organization

KEY_PREFIX = "be_"


@dataclass(frozen=True)
class NewApiKey:
    record: ApiKey
    plaintext: str


def hash_key(plaintext: str) -> str:
    # Keys carry 256 bits of randomness, so a fast unsalted hash is safe and lets
    # authentication look a key up by its hash in one indexed query.
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key(organization_id: str, name: str = "default") -> NewApiKey:
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        organization_id=organization_id,
        name=name,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:10],
    )
    return NewApiKey(record=record, plaintext=plaintext)


def create_org_api_key(settings: Settings, org_name: str, key_name: str = "default") -> str:
    """Create the organization if it does not exist and return a new key for it.

    Migrates the database first so a fresh data folder works without `migrate`.
    """
    from builder_engine.db.engine import create_sync_engine
    from builder_engine.db.migrate import upgrade

    upgrade(settings)
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as session:
            org = session.exec(select(Organization).where(Organization.name == org_name)).first()
            if org is None:
                org = Organization(name=org_name)
                session.add(org)
                session.flush()
            new_key = generate_key(org.id, key_name)
            session.add(new_key.record)
            session.commit()
            return new_key.plaintext
    finally:
        engine.dispose()
