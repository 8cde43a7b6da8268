"""Transactions whose reads must stay true until they commit (delete an input vs submit a job that names it).

PostgreSQL: row locks. The submit takes `FOR SHARE` on the inputs it names, the delete `FOR UPDATE` on the input
it removes; whichever comes second waits for the first to commit and then sees its outcome (a deleted row is no
longer returned; a committed job is seen by the delete's reference check, a new statement under READ COMMITTED).

SQLite has no row locks: both take the database's write lock first (`BEGIN IMMEDIATE`), so the two transactions
run one after the other, and each reads the state the other left.
"""

from __future__ import annotations

from sqlalchemy import Select
from sqlalchemy.orm import Session


def begin_write(session: Session) -> None:
    """On SQLite, start the session's transaction with the database write lock (no-op where one is already open,
    since its first write took the lock); elsewhere nothing, the row locks of `locked` do it."""
    if session.get_bind().dialect.name != "sqlite":
        return
    connection = session.connection()
    driver = connection.connection.driver_connection
    assert driver is not None  # a connection the session checked out has its DBAPI connection
    if not driver.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def locked(query: Select, *, shared: bool) -> Select:
    """`query` with a row lock (`FOR SHARE` when `shared`, else `FOR UPDATE`; SQLite ignores it: see
    `begin_write`), re-reading the rows even if the session already holds them."""
    return query.with_for_update(read=shared).execution_options(populate_existing=True)
