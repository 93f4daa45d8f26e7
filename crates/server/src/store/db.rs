//! One database connection, to SQLite (embedded, the default) or PostgreSQL (`moat serve
//! --store postgres://…`), behind one small API that the store's table modules use: execute,
//! query a row or many, transactions. It exists so that each query is written once: SQL in the
//! subset both engines share, `?N` placeholders (rewritten to `$N` for PostgreSQL), integers,
//! text and blobs as the only column types (see docs/FLEET.md, "The store").
//!
//! Calls are blocking; the store runs them on a blocking thread (`Store::call`), never on the
//! executor, for both backends. The PostgreSQL side uses the `postgres` crate (the blocking
//! client over `tokio-postgres`, which drives the socket on its own small runtime inside each
//! call), reconnects by itself after the server restarts, and runs every transaction at
//! SERIALIZABLE, the isolation SQLite's single writer gives, so that a transaction is as
//! correct with many daemons on one database as with one.

use std::cell::RefCell;
use std::collections::HashMap;

use postgres::types::{FromSql, IsNull, ToSql, Type};

/// What went wrong in the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("query returned no rows")]
    NoRows,
    #[error("column {index}: expected {expected}, found {found}")]
    Type {
        index: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("the connection to PostgreSQL was lost inside a transaction; it was rolled back")]
    LostInTransaction,
}

pub type DbResult<T> = std::result::Result<T, DbError>;

/// postgres::Error's Display says only "db error"; the server's message and detail are in its
/// `DbError`.
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    }
}

impl DbError {
    /// The database is (for now) unreachable or busy: the request may be retried.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            DbError::Postgres(e) => pg_connection_lost(e) || pg_serialization_failure(e),
            DbError::LostInTransaction => true,
            _ => false,
        }
    }

    /// Another transaction conflicted with this one (PostgreSQL SERIALIZABLE): running the
    /// whole transaction again is correct.
    pub fn is_serialization_failure(&self) -> bool {
        matches!(self, DbError::Postgres(e) if pg_serialization_failure(e))
    }
}

fn pg_serialization_failure(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// The connection, not the statement, failed: the server went away (restart, failover) or
/// the socket broke. Errors the server sent have a SQLSTATE; those that end a session
/// (class 57P, e.g. an administrator's shutdown) count too.
fn pg_connection_lost(e: &postgres::Error) -> bool {
    match e.code() {
        Some(c) => c.code().starts_with("57P") || c.code().starts_with("08"),
        None => true,
    }
}

/// A value of one column or parameter: the only types moat's schema uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Text(_) => "text",
            Value::Blob(_) => "a blob",
        }
    }
}

/// What may be bound to a placeholder.
pub trait Param {
    fn value(&self) -> Value;
}

impl Param for Value {
    fn value(&self) -> Value {
        self.clone()
    }
}
impl Param for i64 {
    fn value(&self) -> Value {
        Value::Int(*self)
    }
}
impl Param for i32 {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl Param for u32 {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl Param for u16 {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl Param for bool {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl Param for str {
    fn value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl Param for String {
    fn value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl Param for [u8] {
    fn value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl Param for Vec<u8> {
    fn value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value {
        self.as_ref().map_or(Value::Null, Param::value)
    }
}
impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value {
        (**self).value()
    }
}

/// The parameters of one statement: `[]`, an array of one type, `params![…]` or a `Vec`.
pub trait Params {
    fn values(&self) -> Vec<Value>;
}

impl Params for [&dyn Param; 0] {
    fn values(&self) -> Vec<Value> {
        Vec::new()
    }
}
impl Params for &[&dyn Param] {
    fn values(&self) -> Vec<Value> {
        self.iter().map(|p| p.value()).collect()
    }
}
impl Params for Vec<Value> {
    fn values(&self) -> Vec<Value> {
        self.clone()
    }
}
macro_rules! array_params {
    ($($n:literal)*) => {$(
        impl<T: Param> Params for [T; $n] {
            fn values(&self) -> Vec<Value> {
                self.iter().map(Param::value).collect()
            }
        }
    )*};
}
array_params!(1 2 3 4 5 6 7 8);

/// `params![a, b, …]`: parameters of mixed types.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$(&$p as &dyn $crate::store::db::Param),*] as &[&dyn $crate::store::db::Param]
    };
}
pub(crate) use params;

/// One result row, read in full.
pub struct Row {
    values: Vec<Value>,
}

/// A column's position (the only way columns are addressed).
pub trait ColumnIndex {
    fn index(self) -> usize;
}
impl ColumnIndex for usize {
    fn index(self) -> usize {
        self
    }
}

impl Row {
    pub fn get<I: ColumnIndex, T: FromValue>(&self, i: I) -> DbResult<T> {
        let index = i.index();
        let v = self.values.get(index).unwrap_or(&Value::Null);
        T::from_value(v).ok_or(DbError::Type {
            index,
            expected: T::EXPECTED,
            found: v.kind(),
        })
    }
}

/// What a column may be read as.
pub trait FromValue: Sized {
    const EXPECTED: &'static str;
    fn from_value(v: &Value) -> Option<Self>;
}
impl FromValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromValue for u32 {
    const EXPECTED: &'static str = "an integer in 0..2^32";
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| u32::try_from(i).ok())
    }
}
impl FromValue for u16 {
    const EXPECTED: &'static str = "an integer in 0..2^16";
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| u16::try_from(i).ok())
    }
}
impl FromValue for bool {
    const EXPECTED: &'static str = "a boolean (integer)";
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).map(|i| i != 0)
    }
}
impl FromValue for String {
    const EXPECTED: &'static str = "text";
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl FromValue for Vec<u8> {
    const EXPECTED: &'static str = "a blob";
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    const EXPECTED: &'static str = T::EXPECTED;
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// `query_row(…).optional()`: no row is `None`, not an error.
pub trait OptionalExtension<T> {
    fn optional(self) -> DbResult<Option<T>>;
}
impl<T> OptionalExtension<T> for DbResult<T> {
    fn optional(self) -> DbResult<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(DbError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Db {
    conn: Conn,
    /// Open transactions (the outermost is BEGIN, inner ones are savepoints).
    depth: std::cell::Cell<u32>,
}

enum Conn {
    Sqlite(rusqlite::Connection),
    // Boxed: a PostgreSQL client is several times the size of a SQLite handle.
    Postgres(Box<RefCell<Pg>>),
}

struct Pg {
    config: postgres::Config,
    client: Option<postgres::Client>,
    /// Prepared statements of this connection, by their (rewritten) SQL.
    statements: HashMap<String, postgres::Statement>,
}

impl Pg {
    /// The connection, opened again if it broke. With a URL of several hosts and
    /// `target_session_attrs=read-write` (Location::parse requires it), `connect` tries them in
    /// order and keeps the first whose session accepts writes, so a connection opened after a
    /// failover is to the new primary; while there is none, every host refuses and the call
    /// fails (503 `unavailable`) until the next one.
    fn client(&mut self) -> DbResult<&mut postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            self.client = None;
            let mut client = self.config.connect(postgres::NoTls)?;
            // A daemon stopped (SIGSTOP, a partition) inside a transaction must not hold its
            // row locks for ever: the other nodes' sweep of lost nodes waits on them. Every
            // transaction here runs in one go on a blocking thread, never idle for long.
            client.batch_execute("SET idle_in_transaction_session_timeout = '5s'")?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }

    /// The prepared statement for `sql` on the current connection.
    fn prepared(&mut self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let client = self
            .client
            .as_mut()
            .expect("connected before any statement");
        let s = client.prepare(sql)?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Runs `f` on the connection. Outside a transaction, when the connection turns out to be
    /// dead (the server restarted or failed over since the last call), it runs `f` once more
    /// on a fresh one. A server shutting down ends its sessions before or instead of
    /// committing what they run, so the first attempt did not commit.
    fn run<T>(
        &mut self,
        in_tx: bool,
        mut f: impl FnMut(&mut Pg) -> Result<T, postgres::Error>,
    ) -> DbResult<T> {
        for attempt in 0..2 {
            if let Err(e) = self.client() {
                if in_tx {
                    return Err(DbError::LostInTransaction);
                }
                return Err(e);
            }
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if pg_connection_lost(&e) => {
                    self.client = None;
                    if in_tx {
                        return Err(DbError::LostInTransaction);
                    }
                    if attempt == 1 {
                        return Err(e.into());
                    }
                    tracing::warn!(error = %pg_message(&e), "the PostgreSQL connection was lost; reconnecting");
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn statement<T>(
        &mut self,
        in_tx: bool,
        sql: &str,
        mut f: impl FnMut(&mut postgres::Client, &postgres::Statement) -> Result<T, postgres::Error>,
    ) -> DbResult<T> {
        let sql = to_dollar_placeholders(sql);
        self.run(in_tx, |pg| {
            let stmt = pg.prepared(&sql)?;
            let client = pg.client.as_mut().expect("connected by run");
            f(client, &stmt)
        })
    }
}

impl Drop for Pg {
    /// Closing the client blocks on its own runtime, which panics on an executor thread (the
    /// last `Store` clone may go in async code, e.g. at shutdown): close it on a thread of its
    /// own.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = std::thread::Builder::new()
                .name("moat-pg-close".into())
                .spawn(move || drop(client));
        }
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("an integer cannot be bound to a {ty} parameter").into()),
            },
            Value::Text(s) if <&str as ToSql>::accepts(ty) => s.as_str().to_sql(ty, out),
            Value::Blob(b) if <&[u8] as ToSql>::accepts(ty) => b.as_slice().to_sql(ty, out),
            v => Err(format!("{} cannot be bound to a {ty} parameter", v.kind()).into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => Value::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::BOOL => Value::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::BYTEA => Value::Blob(<Vec<u8>>::from_sql(ty, raw)?),
            _ if <String as FromSql>::accepts(ty) => Value::Text(String::from_sql(ty, raw)?),
            _ => return Err(format!("moat's store has no column of type {ty}").into()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_row(r: &rusqlite::Row<'_>, columns: usize) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let mut values = Vec::with_capacity(columns);
    for i in 0..columns {
        values.push(match r.get_ref(i)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(f) => {
                return Err(rusqlite::Error::InvalidColumnType(
                    i,
                    format!("{f}"),
                    rusqlite::types::Type::Real,
                ))
            }
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        });
    }
    Ok(Row { values })
}

fn pg_row(r: &postgres::Row) -> DbResult<Row> {
    let mut values = Vec::with_capacity(r.len());
    for i in 0..r.len() {
        values.push(r.try_get::<_, Value>(i)?);
    }
    Ok(Row { values })
}

/// `?N` and `?` placeholders to PostgreSQL's `$N` (outside quoted strings).
pub fn to_dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let (mut quoted, mut next) = (false, 1);
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                out.push('$');
                if chars.peek().is_some_and(char::is_ascii_digit) {
                    while let Some(d) = chars.next_if(char::is_ascii_digit) {
                        out.push(d);
                    }
                } else {
                    out.push_str(&next.to_string());
                    next += 1;
                }
            }
            c => out.push(c),
        }
    }
    out
}

impl Db {
    pub fn sqlite(conn: rusqlite::Connection) -> Db {
        Db {
            conn: Conn::Sqlite(conn),
            depth: 0.into(),
        }
    }

    /// Connects to PostgreSQL now (a wrong URL or an unreachable server is an error at once);
    /// later calls reconnect by themselves.
    pub fn postgres(config: postgres::Config) -> DbResult<Db> {
        let mut pg = Pg {
            config,
            client: None,
            statements: HashMap::new(),
        };
        pg.client()?;
        Ok(Db {
            conn: Conn::Postgres(Box::new(RefCell::new(pg))),
            depth: 0.into(),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.conn {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    fn in_tx(&self) -> bool {
        self.depth.get() > 0
    }

    /// Runs one statement; the number of rows it changed.
    pub fn execute<P: Params>(&self, sql: &str, params: P) -> DbResult<usize> {
        let values = params.values();
        match &self.conn {
            Conn::Sqlite(c) => Ok(c
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(values.iter()))?),
            Conn::Postgres(pg) => {
                let args: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let n = pg
                    .borrow_mut()
                    .statement(self.in_tx(), sql, |c, s| c.execute(s, &args))?;
                Ok(n as usize)
            }
        }
    }

    /// Runs statements separated by `;`, without parameters (migrations).
    pub fn execute_batch(&self, sql: &str) -> DbResult<()> {
        match &self.conn {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(pg) => pg.borrow_mut().run(self.in_tx(), |pg| {
                pg.client
                    .as_mut()
                    .expect("connected by run")
                    .batch_execute(sql)
            }),
        }
    }

    /// Every row of a query, each turned into a `T` by `f`.
    pub fn query_map<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        mut f: impl FnMut(&Row) -> DbResult<T>,
    ) -> DbResult<Vec<T>> {
        let values = params.values();
        let rows = match &self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let rows = stmt.query_map(rusqlite::params_from_iter(values.iter()), |r| {
                    sqlite_row(r, n)
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            }
            Conn::Postgres(pg) => {
                let args: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let rows = pg
                    .borrow_mut()
                    .statement(self.in_tx(), sql, |c, s| c.query(s, &args))?;
                rows.iter().map(pg_row).collect::<DbResult<Vec<_>>>()?
            }
        };
        rows.iter().map(&mut f).collect()
    }

    /// The first row of a query, turned into a `T` by `f`; [`DbError::NoRows`] when there is
    /// none.
    pub fn query_row<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row) -> DbResult<T>,
    ) -> DbResult<T> {
        let mut f = Some(f);
        let mut out = self.query_map(sql, params, |r| match f.take() {
            Some(f) => f(r).map(Some),
            None => Ok(None),
        })?;
        match out.first_mut().and_then(Option::take) {
            Some(v) => Ok(v),
            None => Err(DbError::NoRows),
        }
    }

    /// Begins a transaction (a savepoint inside another). It rolls back when dropped without
    /// [`Tx::commit`]. SQLite: `BEGIN IMMEDIATE` (takes the write lock now, so it never fails
    /// half-way on a lock upgrade); PostgreSQL: SERIALIZABLE.
    pub fn transaction(&self) -> DbResult<Tx<'_>> {
        let depth = self.depth.get();
        let sql = match (depth, self.backend()) {
            (0, Backend::Sqlite) => "BEGIN IMMEDIATE".to_string(),
            (0, Backend::Postgres) => "BEGIN ISOLATION LEVEL SERIALIZABLE".to_string(),
            (d, _) => format!("SAVEPOINT moat_{d}"),
        };
        self.execute_batch(&sql)?;
        self.depth.set(depth + 1);
        Ok(Tx {
            db: self,
            done: false,
        })
    }

    fn end(&self, commit: bool) -> DbResult<()> {
        let depth = self.depth.get() - 1;
        let sql = match (depth, commit) {
            (0, true) => "COMMIT".to_string(),
            (0, false) => "ROLLBACK".to_string(),
            (d, true) => format!("RELEASE SAVEPOINT moat_{d}"),
            (d, false) => format!("ROLLBACK TO SAVEPOINT moat_{d}; RELEASE SAVEPOINT moat_{d}"),
        };
        // The transaction is over whatever the outcome: a failed COMMIT has rolled back.
        let r = self.execute_batch(&sql);
        self.depth.set(depth);
        if r.is_err() && depth == 0 && !commit {
            // A ROLLBACK that failed left nothing open on a live connection; a dead one is
            // reconnected by the next call.
            return Ok(());
        }
        r
    }
}

/// An open transaction; derefs to its connection.
pub struct Tx<'a> {
    db: &'a Db,
    done: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> DbResult<()> {
        self.done = true;
        self.db.end(true)
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.db.end(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_strings() {
        assert_eq!(
            to_dollar_placeholders("SELECT a FROM t WHERE b = ?1 AND c = '?' AND d IN (?2, ?10)"),
            "SELECT a FROM t WHERE b = $1 AND c = '?' AND d IN ($2, $10)"
        );
        assert_eq!(
            to_dollar_placeholders("WHERE a = ? AND b = ? LIMIT ?"),
            "WHERE a = $1 AND b = $2 LIMIT $3"
        );
    }
}
