"""The SQL schema, shared by SQLite, MariaDB/MySQL and PostgreSQL.

Alembic migrations (storage/migrations) create and upgrade it; this module is what the
stores build their queries from. Ids are 64-bit integers (plain INTEGER on SQLite so
that it autoincrements), timestamps are milliseconds since the epoch.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql

metadata = MetaData()

Id = BigInteger().with_variant(Integer(), "sqlite")
# Names compare exactly (case-sensitive), whatever the server's default collation.
NameType = String(32).with_variant(mysql.VARCHAR(32, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
CmidType = String(64).with_variant(mysql.VARCHAR(64, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
Text256 = String(256).with_variant(mysql.VARCHAR(256, charset="utf8mb4"), "mysql", "mariadb")
MYSQL: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "mysql_engine": "InnoDB"}

users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", NameType, nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    **MYSQL,
)

tokens = Table(
    "tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", BigInteger, nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    **MYSQL,
)

friendships = Table(
    "friendships",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("friend_id", BigInteger, primary_key=True, autoincrement=False),
    Column("created_at", BigInteger, nullable=False),
    **MYSQL,
)

friend_requests = Table(
    "friend_requests",
    metadata,
    Column("from_id", BigInteger, primary_key=True, autoincrement=False),
    Column("to_id", BigInteger, primary_key=True, autoincrement=False),
    Column("note", Text256, nullable=False),
    Column("ts", BigInteger, nullable=False),
    Index("ix_friend_requests_to", "to_id"),
    **MYSQL,
)

chat_groups = Table(
    "chat_groups",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", NameType, nullable=False),
    Column("description", Text256, nullable=False),
    Column("creator_id", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    **MYSQL,
)

group_members = Table(
    "group_members",
    metadata,
    Column("group_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("role", String(16), nullable=False),
    Column("joined_at", BigInteger, nullable=False),
    Index("ix_group_members_user", "user_id"),
    **MYSQL,
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("sender_id", BigInteger, nullable=False),
    Column("to_user_id", BigInteger, nullable=True),
    Column("group_id", BigInteger, nullable=True),
    # The unordered pair of a direct conversation, so its history is one index range.
    Column("peer_lo", BigInteger, nullable=True),
    Column("peer_hi", BigInteger, nullable=True),
    Column("text", Text, nullable=False),
    Column("ts", BigInteger, nullable=False),
    Index("ix_messages_group", "group_id", "id"),
    Index("ix_messages_pair", "peer_lo", "peer_hi", "id"),
    **MYSQL,
)

# One row per delivery: message `message_id` is number `seq` in `user_id`'s inbox.
inbox = Table(
    "inbox",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("message_id", BigInteger, nullable=False),
    **MYSQL,
)

# Per user: the last seq handed out and the cumulative ack. Writers lock this row
# (in user-id order) to hand out seqs, which makes commit order the seq order.
inbox_state = Table(
    "inbox_state",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("acked_seq", BigInteger, nullable=False),
    **MYSQL,
)

message_cmids = Table(
    "message_cmids",
    metadata,
    Column("sender_id", BigInteger, primary_key=True, autoincrement=False),
    Column("cmid", CmidType, primary_key=True),
    Column("message_id", BigInteger, nullable=False),
    Column("ts", BigInteger, nullable=False),
    **MYSQL,
)

# Named counters; `message_id` hands out message ids inside the writing transaction,
# under its row lock, so ids grow in commit order on every database.
counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
    **MYSQL,
)
