"""Accounts: registration, password and token login, logout, lookup."""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import Executor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from clusterchat.errors import BadCredentials, NameTaken, NoSuchUser
from clusterchat.storage.accounts import NameExists, TokenStore, UserRecord, UserStore


def make_hasher(memory_kib: int = 19456, time_cost: int = 2) -> PasswordHasher:
    """argon2id with OWASP's minimum (19 MiB, 2 passes, 1 lane) by default."""
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)


class AccountService:
    def __init__(self, users: UserStore, tokens: TokenStore, hasher: PasswordHasher,
                 executor: Executor, token_ttl_s: float) -> None:
        self._users = users
        self._tokens = tokens
        self._hasher = hasher
        self._executor = executor
        self._ttl_ms = int(token_ttl_s * 1000)
        self._dummy_hash: str | None = None

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def register(self, name: str, password: str) -> int:
        if await self._users.by_name(name) is not None:
            raise NameTaken(f"the name {name!r} is taken")
        password_hash = await self._run(self._hasher.hash, password)
        try:
            return await self._users.create(name, password_hash)
        except NameExists:
            raise NameTaken(f"the name {name!r} is taken") from None

    async def authenticate(self, name: str, password: str) -> UserRecord:
        user = await self._users.by_name(name)
        if user is None:
            # Spend the same time as a real check, so timing does not tell which names exist.
            if self._dummy_hash is None:
                self._dummy_hash = await self._run(self._hasher.hash, secrets.token_hex(8))
            await self._run(self._verify, self._dummy_hash, password)
            raise BadCredentials()
        if not await self._run(self._verify, user.password_hash, password):
            raise BadCredentials()
        return user

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    async def authenticate_token(self, token: str) -> UserRecord:
        user = await self._tokens.resolve(token)
        if user is None:
            raise BadCredentials("the token is unknown, expired or revoked")
        return user

    async def issue_token(self, user_id: int) -> str:
        token = secrets.token_urlsafe(32)
        await self._tokens.add(token, user_id, self._ttl_ms)
        return token

    async def revoke(self, token: str) -> None:
        await self._tokens.revoke(token)

    async def lookup(self, name: str) -> dict[str, object]:
        user = await self._users.by_name(name)
        if user is None:
            raise NoSuchUser(f"no user is named {name!r}")
        return {"user": {"id": user.id, "name": user.name}}

    async def name_of(self, user_id: int) -> str | None:
        return await self._users.name_of(user_id)
