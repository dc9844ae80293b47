"""The console's database schema comes from its Alembic migrations, and its users file keeps
only scrypt hashes and refuses what it cannot trust."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from console.db import Base, Call, Store, alembic_config
from console.users import (
    UsersFileError,
    check_login,
    hash_password,
    load_users,
    verify_password,
)


def test_migrations_build_the_models_schema_and_keep_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'console.db'}"
    store = Store(url)
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, Base.metadata) == []  # no model change unmigrated
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert context.get_current_revision() == head
    with store.session() as s:
        s.add(Call(id="abc", server="s", stream_id="abc", opened_at=1.0))
    again = Store(url)  # a restart runs the migrations again: nothing lost
    with again.session() as s:
        assert s.get(Call, "abc") is not None


def test_passwords_are_salted_scrypt_hashes() -> None:
    one, two = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert one != two and one.startswith("scrypt$") and "s3cret" not in one
    assert verify_password("s3cret-pass", one) and not verify_password("s3cret-pasS", one)
    assert not verify_password("x", "scrypt$garbage") and not verify_password("x", "")


def test_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"# desk\nana:analyst:{hash_password('pw-ana-123')}\n\n"
                     f"vic:viewer:{hash_password('pw-vic-123')}\n")
    loaded = load_users(users)
    assert loaded["ana"].can("analyst") and loaded["vic"].can("viewer")
    assert not loaded["vic"].can("analyst")
    assert check_login(loaded, "ana", "pw-ana-123") == loaded["ana"]
    assert check_login(loaded, "ana", "pw-vic-123") is None
    assert check_login(loaded, "nobody", "pw-ana-123") is None
    good = hash_password("pw")
    for bad in ("ana:analyst:plaintext", f"ana:admin:{good}", f"a b:viewer:{good}",
                f"ana:viewer:{good}\nana:analyst:{good}", "ana:viewer", ""):
        users.write_text(bad + "\n")
        with pytest.raises(UsersFileError):
            load_users(users)
