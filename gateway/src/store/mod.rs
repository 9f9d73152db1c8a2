//! The database: embedded SQLite by default (a file, WAL), PostgreSQL when the URL says
//! so. One `AnyPool` and portable SQL (`$N` placeholders work on both drivers), so every
//! query is written once and the same test suite runs on both.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// Migrations in order; each runs once, recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_ledger.sql")),
    (3, include_str!("../../migrations/0003_payments.sql")),
    (4, include_str!("../../migrations/0004_limits_reservations.sql")),
    (5, include_str!("../../migrations/0005_quality_levels.sql")),
    (6, include_str!("../../migrations/0006_ads.sql")),
    (7, include_str!("../../migrations/0007_responses.sql")),
    (8, include_str!("../../migrations/0008_provider_trust.sql")),
    (9, include_str!("../../migrations/0009_provider_links.sql")),
    (10, include_str!("../../migrations/0010_replicas.sql")),
    (11, include_str!("../../migrations/0011_provider_health.sql")),
    (12, include_str!("../../migrations/0012_campaign_spending.sql")),
];

/// Every SQLite connection's set-up, sqlx's and `Direct`'s. WAL lets readers run
/// beside the writer; NORMAL sync is durable across process crashes (not power loss),
/// which is what an embedded single-node store promises.
const SQLITE_PRAGMAS: &[&str] =
    &["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL", "PRAGMA busy_timeout = 5000", "PRAGMA foreign_keys = ON"];

/// And a writing connection's:
/// - it never checkpoints: SQLite would do it inside the commit that crosses 1,000 WAL
///   pages, with an fsync, and every request waiting for that batch's settlement would
///   wait for it too (p99 5.5 ms instead of 2.2–2.6 ms at 250 req/s; BENCHMARKS.md).
///   `Store::checkpoint` does it instead, mostly from a reader connection;
/// - when the WAL starts over after a burst, its file is cut back to 64 MiB instead of
///   keeping its high-water mark.
const SQLITE_WRITER_PRAGMAS: &[&str] = &["PRAGMA wal_autocheckpoint = 0", "PRAGMA journal_size_limit = 67108864"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    /// Every write, and reads that belong to a write's transaction. SQLite: one
    /// connection (one writer; see `connect`).
    pub pool: AnyPool,
    /// Reads on the request path. SQLite: separate connections that only read, so a
    /// read never queues behind the writer's batch (WAL readers never block). PostgreSQL:
    /// the same pool as `pool`.
    pub read: AnyPool,
    pub backend: Backend,
    /// Request holds in memory: SQLite only, whose database belongs to one process
    /// (`holds`). PostgreSQL, shared by replicas, keeps holds in the `holds` table.
    pub book: Option<std::sync::Arc<crate::money::holds::HoldBook>>,
    /// SQLite file only: the connection the request-end writer commits its batches on
    /// (`lease_writer`).
    direct: Option<std::sync::Arc<Direct>>,
}

impl Store {
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres") { Backend::Postgres } else { Backend::Sqlite };
        let url = match backend {
            // Create the file when it does not exist yet.
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool_options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let store = match backend {
            Backend::Sqlite => {
                let sqlite = |connections: u32, writer: bool| {
                    // No ping before each acquire: an embedded database's connection
                    // cannot drop, and the ping is one more round trip to sqlx's
                    // SQLite thread on every balance read and every settlement batch.
                    let options = pool_options.clone().max_connections(connections).test_before_acquire(false);
                    options.after_connect(move |conn, _| {
                        Box::pin(async move {
                            let writes: &[&str] = if writer { SQLITE_WRITER_PRAGMAS } else { &[] };
                            for pragma in SQLITE_PRAGMAS.iter().chain(writes) {
                                conn.execute(*pragma).await?;
                            }
                            Ok(())
                        })
                    })
                };
                let pool = sqlite(1, true).connect_with(options.clone()).await?;
                // An in-memory database exists once per connection: it reads through
                // the writer's. A file gets reader connections, made lazily (after the
                // writer created the file and set WAL mode).
                let read = if url.contains(":memory:") || url.contains("mode=memory") {
                    pool.clone()
                } else {
                    sqlite(4, false).min_connections(0).connect_lazy_with(options)
                };
                Self { pool, read, backend, book: Some(std::sync::Arc::default()), direct: None }
            }
            Backend::Postgres => {
                let pool = pool_options.max_connections(16).connect_with(options).await?;
                Self { read: pool.clone(), pool, backend, book: None, direct: None }
            }
        };
        store.migrate().await?;
        if backend == Backend::Sqlite && !url.contains(":memory:") && !url.contains("mode=memory") {
            let path = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?.get_filename().to_owned();
            let direct = Direct::open(&path).map_err(direct_error)?;
            return Ok(Self { direct: Some(std::sync::Arc::new(direct)), ..store });
        }
        Ok(store)
    }

    /// The first row of a read on the request path (`read`'s job): on an SQLite file
    /// on one of `Direct`'s reader connections, inline on the caller's thread (a
    /// hand-off to sqlx's SQLite thread and back costs more than the read); elsewhere
    /// on the `read` pool.
    pub async fn read_one<T: Fetch>(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<T>, sqlx::Error> {
        match &self.direct {
            Some(direct) => direct.read(sql, params).map_err(direct_error),
            None => sqlx_query(sql, params).fetch_optional(&self.read).await?.as_ref().map(T::from_any).transpose(),
        }
    }

    /// Takes the sqlx writer's one connection and with it the right to write on the
    /// direct connection (SQLite files only; `None` elsewhere): SQLite has one writer,
    /// and two would sleep in its busy handler. The request-end writer keeps the lease
    /// across back-to-back batches (`usage`), because each time sqlx gets its
    /// connection back it pings it on its SQLite thread first, a hand-off that the
    /// next batch would wait for.
    pub async fn lease_writer(&self) -> Result<Option<WriterLease>, sqlx::Error> {
        let Some(direct) = &self.direct else { return Ok(None) };
        let writer = self.pool.acquire().await?;
        Ok(Some(WriterLease { direct: std::sync::Arc::clone(direct), _writer: writer }))
    }

    /// Applies the migrations not applied yet. On PostgreSQL, replicas starting at once
    /// take turns (a session advisory lock held on one connection meanwhile), so a
    /// migration never runs twice.
    async fn migrate(&self) -> Result<(), sqlx::Error> {
        const MIGRATION_LOCK: i64 = 0x6773_6d69_6772; // "gsmigr"
        let mut lock = match self.backend {
            Backend::Postgres => {
                let mut conn = self.pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
                Some(conn)
            }
            Backend::Sqlite => None,
        };
        let applied = self.apply_migrations().await;
        if let Some(conn) = &mut lock {
            sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK).execute(&mut **conn).await?;
        }
        applied
    }

    async fn apply_migrations(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        for (version, sql) in MIGRATIONS {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&self.pool)
                    .await?;
            if applied.is_some() {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            // Comments may contain `;`: drop them before splitting into statements.
            let sql = strip_comments(sql);
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                tx.execute(statement).await?;
            }
            sqlx::query(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2) ON CONFLICT (version) DO NOTHING",
            )
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(version, "applied migration");
        }
        Ok(())
    }

    /// Copies the WAL's committed pages into the SQLite database file and lets the WAL
    /// start over; the gateway calls it every `sqlite_checkpoint_ms` (`server`), since
    /// the writer connection never checkpoints on its own. Two passive checkpoints
    /// (they wait for no one):
    ///
    /// 1. on a reader connection, the bulk, while the writer goes on committing;
    /// 2. on the writer's own connection, what was committed meanwhile (a few pages).
    ///    Nothing commits during it, so it leaves the whole WAL copied, and the writer's
    ///    next commit starts the WAL file over instead of appending to it.
    ///
    /// The first alone never catches up with a writer that does not pause: the WAL
    /// then never starts over and grew by 75 MB/s at 1,000 req/s (BENCHMARKS.md).
    /// Returns the WAL's frames and how many of them are now in the database file
    /// after the second; `None` on PostgreSQL.
    pub async fn checkpoint(&self) -> Result<Option<(i64, i64)>, sqlx::Error> {
        use sqlx::Row;
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&self.read).await?;
        // The request-end writer gives its lease back after its batch when it sees
        // this one waiting for the writer (`WriterLease::wanted`).
        let waiting = self.direct.as_ref().map(|d| Waiting::on(&d.writer_wanted));
        let mut writer = self.pool.acquire().await?;
        drop(waiting);
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut *writer).await?;
        Ok(Some((row.try_get::<i64, _>(1)?, row.try_get::<i64, _>(2)?)))
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
    }

    /// Stores `value` unless the key already has one; returns the value that is stored.
    pub async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, sqlx::Error> {
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(self.setting(key).await?.unwrap_or_else(|| value.to_owned()))
    }
}

/// A bound value of a multi-row statement.
pub enum Param<'a> {
    Str(&'a str),
    Int(i64),
    /// Typed nulls: PostgreSQL refuses a text NULL for a BIGINT column.
    OptStr(Option<&'a str>),
    OptInt(Option<i64>),
}

/// `$start, $start+1, …` for `n` values.
pub fn placeholders(start: usize, n: usize) -> String {
    (start..start + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// An owned bound value of a `Script`.
enum Value {
    Str(String),
    Int(i64),
    OptStr(Option<String>),
    OptInt(Option<i64>),
}

impl From<&Param<'_>> for Value {
    fn from(p: &Param<'_>) -> Self {
        match p {
            Param::Str(s) => Value::Str((*s).to_owned()),
            Param::Int(v) => Value::Int(*v),
            Param::OptStr(v) => Value::OptStr(v.map(str::to_owned)),
            Param::OptInt(v) => Value::OptInt(*v),
        }
    }
}

impl Value {
    fn as_param(&self) -> Param<'_> {
        match self {
            Value::Str(s) => Param::Str(s),
            Value::Int(v) => Param::Int(*v),
            Value::OptStr(v) => Param::OptStr(v.as_deref()),
            Value::OptInt(v) => Param::OptInt(*v),
        }
    }
}

/// SQLite's limit on one query's `$N` (`SQLITE_MAX_VARIABLE_NUMBER`).
const SQLITE_MAX_PARAMS: usize = 32_766;

/// Writes of one transaction that return nothing, gathered and then sent in as few
/// round trips as the backend allows. On SQLite they go as one multi-statement query:
/// sqlx runs its statements in order on the connection's thread and binds `$N` by
/// number across the whole text, so a settlement batch's inserts and updates cost one
/// hand-off to that thread instead of one each. PostgreSQL's extended protocol takes
/// one statement per query, so there they go one by one.
pub struct Script {
    one_query: bool,
    queries: Vec<(String, Vec<Value>)>,
}

impl Script {
    /// A script for the transaction's database. The direct connection prepares one
    /// statement at a time (and has no hand-offs to save), so there they stay apart.
    pub fn for_tx(tx: &WriteTx<'_, '_>) -> Self {
        let one_query = match tx {
            WriteTx::Sqlx(tx) => tx.backend_name() == <sqlx::Sqlite as sqlx::Database>::NAME,
            WriteTx::Direct(_) => false,
        };
        Self { one_query, queries: Vec::new() }
    }

    /// Adds a statement. `sql(first)` numbers its placeholders `$first`, `$first + 1`,
    /// … in the order of `params`.
    pub fn push<'p>(&mut self, params: impl IntoIterator<Item = &'p Param<'p>>, sql: impl FnOnce(usize) -> String) {
        let values: Vec<Value> = params.into_iter().map(Value::from).collect();
        match self.queries.last_mut() {
            Some((text, bound)) if self.one_query && bound.len() + values.len() <= SQLITE_MAX_PARAMS => {
                text.push_str(";\n");
                text.push_str(&sql(bound.len() + 1));
                bound.extend(values);
            }
            _ => self.queries.push((sql(1), values)),
        }
    }

    /// One multi-row `INSERT` per 64 `rows` (each row the same width): SQLite looks
    /// `$N` parameters up by name, which grows quadratically with one statement's
    /// parameter count.
    pub fn insert_rows(&mut self, head: &str, tail: &str, rows: &[Vec<Param<'_>>]) {
        for chunk in rows.chunks(64) {
            self.push(chunk.iter().flatten(), |first| {
                let mut sql = String::from(head);
                let mut n = first;
                for (i, row) in chunk.iter().enumerate() {
                    sql.push_str(if i == 0 { " (" } else { ", (" });
                    sql.push_str(&placeholders(n, row.len()));
                    sql.push(')');
                    n += row.len();
                }
                sql.push_str(tail);
                sql
            });
        }
    }

    pub async fn run(self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), sqlx::Error> {
        for (sql, values) in &self.queries {
            let params: Vec<Param<'_>> = values.iter().map(Value::as_param).collect();
            sqlx_query(sql, &params).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// A second connection to an SQLite file, on which the request-end writer commits a
/// whole settlement batch (begin, the idempotency read, the inserts and updates,
/// commit) in one call on its own task's thread: through sqlx each statement is a
/// hand-off to sqlx's per-connection SQLite thread and back, four per batch, and on a
/// busy machine each hand-off waits for a thread to be scheduled (p50 ~100 µs, p99
/// over 1 ms at 1,000 req/s; BENCHMARKS.md). It is opened after the migrations and
/// set up as the sqlx writer is: it never checkpoints (`checkpoint` does).
///
/// It also keeps read-only connections for `Store::read_one`, for the same reason.
pub struct Direct {
    conn: std::sync::Mutex<rusqlite::Connection>,
    path: std::path::PathBuf,
    /// Idle reader connections; a read takes one (or opens one) and puts it back.
    readers: std::sync::Mutex<Vec<rusqlite::Connection>>,
    /// Tasks waiting to take the sqlx writer's connection from a `WriterLease`.
    writer_wanted: std::sync::atomic::AtomicUsize,
}

/// Idle reader connections kept (more may be open while reads overlap).
const DIRECT_READERS: usize = 4;

impl Direct {
    fn open(path: &std::path::Path) -> rusqlite::Result<Self> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::set_up(&conn, SQLITE_WRITER_PRAGMAS)?;
        Ok(Self { conn: std::sync::Mutex::new(conn), path: path.to_owned(), readers: std::sync::Mutex::default(), writer_wanted: Default::default() })
    }

    /// The sqlx connections' pragmas (`writes`: a writer's too). Some answer with a
    /// row, so each is stepped once rather than executed.
    fn set_up(conn: &rusqlite::Connection, writes: &[&str]) -> rusqlite::Result<()> {
        for pragma in SQLITE_PRAGMAS.iter().chain(writes) {
            conn.prepare(pragma)?.raw_query().next()?;
        }
        // A batch's statements differ in their row counts; keep the common ones prepared.
        conn.set_prepared_statement_cache_capacity(64);
        Ok(())
    }

    fn read<T: Fetch>(&self, sql: &str, params: &[Param<'_>]) -> rusqlite::Result<Option<T>> {
        let idle = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                let c = rusqlite::Connection::open_with_flags(
                    &self.path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                Self::set_up(&c, &[])?;
                c
            }
        };
        let row = prepare_direct(&conn, sql, params)?.raw_query().next()?.map(T::from_direct).transpose()?;
        let mut readers = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if readers.len() < DIRECT_READERS {
            readers.push(conn);
        }
        Ok(row)
    }
}

/// The sqlx writer's connection, held so that `Direct` may write (`Store::lease_writer`).
pub struct WriterLease {
    direct: std::sync::Arc<Direct>,
    _writer: sqlx::pool::PoolConnection<sqlx::Any>,
}

/// Counts a task waiting for the sqlx writer while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl WriterLease {
    /// Whether the checkpoint waits for this lease (its holder should give it back).
    pub fn wanted(&self) -> bool {
        self.direct.writer_wanted.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Begins a write transaction on the direct connection.
    pub fn begin(&self) -> Result<DirectTx<'_>, sqlx::Error> {
        let mut tx = DirectTx { direct: &self.direct, open: false };
        tx.call(|c| c.execute_batch("BEGIN IMMEDIATE"))?;
        tx.open = true;
        Ok(tx)
    }
}

/// An open transaction on `Direct`; dropped without `commit`, it rolls back.
pub struct DirectTx<'s> {
    direct: &'s Direct,
    open: bool,
}

impl DirectTx<'_> {
    fn call<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>) -> Result<T, sqlx::Error> {
        let conn = self.direct.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&conn).map_err(direct_error)
    }

    pub fn commit(mut self) -> Result<(), sqlx::Error> {
        self.call(|c| c.execute_batch("COMMIT"))?;
        self.open = false;
        Ok(())
    }
}

impl Drop for DirectTx<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = self.call(|c| c.execute_batch("ROLLBACK")) {
                tracing::error!(error = %e, "could not roll back the direct connection's transaction");
            }
        }
    }
}

fn direct_error(e: rusqlite::Error) -> sqlx::Error {
    sqlx::Error::AnyDriverError(Box::new(e))
}

/// `sql`, prepared (or taken from the connection's cache) with `values` bound by the
/// number in each `$N` placeholder, as sqlx binds them.
fn prepare_direct<'c>(conn: &'c rusqlite::Connection, sql: &str, values: &[Param<'_>]) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut statement = conn.prepare_cached(sql)?;
    for i in 1..=statement.parameter_count() {
        let name = statement.parameter_name(i).unwrap_or_default();
        let n = name.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()).filter(|n| *n >= 1);
        let Some(n) = n else { return Err(rusqlite::Error::InvalidParameterName(name.to_owned())) };
        let value = values.get(n - 1).ok_or(rusqlite::Error::InvalidParameterCount(n, values.len()))?;
        statement.raw_bind_parameter(i, value)?;
    }
    Ok(statement)
}

/// `sql` with `params` bound, for sqlx.
fn sqlx_query<'q>(sql: &'q str, params: &[Param<'q>]) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    params.iter().fold(sqlx::query(sql), |q, p| match *p {
        Param::Str(s) => q.bind(s),
        Param::Int(v) => q.bind(v),
        Param::OptStr(v) => q.bind(v),
        Param::OptInt(v) => q.bind(v),
    })
}

/// A write transaction that the ledger's batch runs in: sqlx's, or the direct
/// connection's, whose calls finish before they return (the futures never wait).
pub enum WriteTx<'t, 'c> {
    Sqlx(&'t mut sqlx::Transaction<'c, sqlx::Any>),
    Direct(&'t mut DirectTx<'c>),
}

/// A row type `WriteTx::fetch_all` can return from either connection.
pub trait Fetch: Sized {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error>;
    fn from_direct(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

impl Fetch for String {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        sqlx::Row::try_get(row, 0)
    }

    fn from_direct(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

impl Fetch for i64 {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        sqlx::Row::try_get(row, 0)
    }

    fn from_direct(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        row.get(0)
    }
}

impl Fetch for (i64, i64) {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok((sqlx::Row::try_get(row, 0)?, sqlx::Row::try_get(row, 1)?))
    }

    fn from_direct(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?))
    }
}

impl Fetch for (String, String, i64) {
    fn from_any(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok((sqlx::Row::try_get(row, 0)?, sqlx::Row::try_get(row, 1)?, sqlx::Row::try_get(row, 2)?))
    }

    fn from_direct(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    }
}

impl WriteTx<'_, '_> {
    /// Runs a query that returns rows (`UPDATE … RETURNING` included).
    pub async fn fetch_all<T: Fetch>(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<T>, sqlx::Error> {
        match self {
            WriteTx::Sqlx(tx) => sqlx_query(sql, params).fetch_all(&mut ***tx).await?.iter().map(T::from_any).collect(),
            WriteTx::Direct(tx) => tx.call(|c| {
                let mut statement = prepare_direct(c, sql, params)?;
                let mut rows = statement.raw_query();
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(T::from_direct(row)?);
                }
                Ok(out)
            }),
        }
    }

    /// Runs a statement that returns nothing.
    pub async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Sqlx(tx) => sqlx_query(sql, params).execute(&mut ***tx).await.map(drop),
            WriteTx::Direct(tx) => tx.call(|c| prepare_direct(c, sql, params)?.raw_execute().map(drop)),
        }
    }

    /// Runs `script`'s statements in order.
    pub async fn run(&mut self, script: Script) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Sqlx(tx) => script.run(tx).await,
            WriteTx::Direct(tx) => tx.call(|c| {
                for (sql, values) in &script.queries {
                    let params: Vec<Param<'_>> = values.iter().map(Value::as_param).collect();
                    prepare_direct(c, sql, &params)?.raw_execute()?;
                }
                Ok(())
            }),
        }
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Str(s) => s.to_sql(),
            Param::Int(v) => v.to_sql(),
            Param::OptStr(v) => v.to_sql(),
            Param::OptInt(v) => v.to_sql(),
        }
    }
}

fn strip_comments(statement: &str) -> String {
    statement.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n").trim().to_owned()
}

/// A Redis answer slower than this counts as Redis being away.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// A Redis call given `REDIS_TIMEOUT`: its answer, or why there is none (an error, or
/// no answer in time). What replicas share through Redis (rate limits, provider slots)
/// falls back to each replica's own share when Redis is away.
pub async fn redis_answer<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Runs a transaction (`attempt`) again, up to five times, when PostgreSQL aborted it
/// as a deadlock's victim or a serialization failure: replicas settling usage and
/// charging ads at once lock accounts in different orders, and a lost charge would be a
/// lost record. Each attempt must be a whole transaction (rolled back on error).
pub async fn retrying_conflicts<T, F, Fut>(mut attempt: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Err(sqlx::Error::Database(e)) if tries < 4 && matches!(e.code().as_deref(), Some("40P01" | "40001")) => {
                tries += 1;
                tracing::debug!(error = %e, tries, "transaction conflict; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(5 << tries)).await;
            }
            other => return other,
        }
    }
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A new random id with a type prefix, e.g. `prov_3f9c…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer leaves checkpoints to `checkpoint`, which moves every committed frame.
    #[tokio::test]
    async fn the_writer_never_checkpoints_and_checkpoint_catches_up() -> Result<(), sqlx::Error> {
        let dir = tempfile::tempdir().map_err(sqlx::Error::Io)?;
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await?;
        let auto: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint").fetch_one(&store.pool).await?;
        assert_eq!(auto, 0);
        for i in 0..50 {
            store.setting_or_insert(&format!("k{i}"), "v").await?;
        }
        let (frames, copied) = store.checkpoint().await?.unwrap_or_default();
        assert!(frames > 0, "the writes are in the WAL");
        assert_eq!(frames, copied, "a passive checkpoint with no other reader copies all of them");
        Ok(())
    }

    /// On SQLite a script's statements go as one query, each bound to its own values.
    #[tokio::test]
    async fn a_script_is_one_query_on_sqlite_with_each_statements_values() -> Result<(), sqlx::Error> {
        let dir = tempfile::tempdir().map_err(sqlx::Error::Io)?;
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await?;
        let mut tx = store.pool.begin().await?;
        let mut script = Script::for_tx(&WriteTx::Sqlx(&mut tx));
        let keys: Vec<String> = (0..70).map(|i| format!("k{i}")).collect();
        let rows: Vec<Vec<Param<'_>>> = keys.iter().map(|k| vec![Param::Str(k), Param::Str("v")]).collect();
        script.insert_rows("INSERT INTO settings (key, value) VALUES", "", &rows);
        script.push(&[Param::Str("changed"), Param::Str("k69")], |first| {
            format!("UPDATE settings SET value = ${} WHERE key = ${}", first, first + 1)
        });
        assert_eq!(script.queries.len(), 1, "70 rows (two INSERTs) and an UPDATE in one query");
        script.run(&mut tx).await?;
        tx.commit().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM settings WHERE key LIKE 'k%'").fetch_one(&store.pool).await?;
        assert_eq!(n, 70);
        assert_eq!(store.setting("k0").await?.as_deref(), Some("v"));
        assert_eq!(store.setting("k68").await?.as_deref(), Some("v"));
        assert_eq!(store.setting("k69").await?.as_deref(), Some("changed"));
        Ok(())
    }

    /// On an SQLite file a direct transaction's calls finish before they return (no
    /// hand-off to another thread), sqlx's writer waits while it is open, and one dropped
    /// without a commit leaves nothing behind.
    #[tokio::test]
    async fn a_direct_transaction_never_waits_and_excludes_the_sqlx_writer() -> Result<(), sqlx::Error> {
        use futures::FutureExt;
        let dir = tempfile::tempdir().map_err(sqlx::Error::Io)?;
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await?;
        let insert = "INSERT INTO settings (key, value) VALUES ($1, $2)";
        let lease = store.lease_writer().await?.expect("a file database has a direct connection");
        let mut tx = lease.begin()?;
        {
            let mut w = WriteTx::Direct(&mut tx);
            w.execute(insert, &[Param::Str("a"), Param::Str("1")]).now_or_never().expect("ready at once")?;
            let mut script = Script::for_tx(&w);
            let keys: Vec<String> = (0..70).map(|i| format!("k{i}")).collect();
            let rows: Vec<Vec<Param<'_>>> = keys.iter().map(|k| vec![Param::Str(k), Param::Str("v")]).collect();
            script.insert_rows("INSERT INTO settings (key, value) VALUES", "", &rows);
            script.push(&[Param::Str("2"), Param::Str("a")], |first| format!("UPDATE settings SET value = ${first} WHERE key = ${}", first + 1));
            w.run(script).now_or_never().expect("ready at once")?;
            let got: Vec<(String, String, i64)> = w
                .fetch_all("SELECT key, value, LENGTH(key) FROM settings WHERE key IN ($2, $1) ORDER BY key", &[Param::Str("k7"), Param::Str("a")])
                .now_or_never()
                .expect("ready at once")?;
            assert_eq!(got, [("a".to_owned(), "2".to_owned(), 1), ("k7".to_owned(), "v".to_owned(), 2)]);
        }
        // A request-path read does not wait for the open transaction: it sees the last commit.
        let before: Option<i64> = store.read_one("SELECT COUNT(*) FROM settings WHERE key = $1", &[Param::Str("a")]).now_or_never().expect("ready at once")?;
        assert_eq!(before, Some(0));
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(100), sqlx::query(insert).bind("b").bind("1").execute(&store.pool)).await;
        assert!(blocked.is_err(), "the sqlx writer waits while a direct transaction is open");
        tx.commit()?;
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(100), sqlx::query(insert).bind("b").bind("1").execute(&store.pool)).await;
        assert!(blocked.is_err(), "the sqlx writer waits as long as the lease is held");
        drop(lease);
        sqlx::query(insert).bind("b").bind("1").execute(&store.pool).await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM settings WHERE key = 'a' OR key LIKE 'k%'").fetch_one(&store.read).await?;
        assert_eq!(n, 71);
        let after: Option<(i64, i64)> =
            store.read_one("SELECT COUNT(*), SUM(LENGTH(value)) FROM settings WHERE key IN ($1, $2)", &[Param::Str("a"), Param::Str("b")]).await?;
        assert_eq!(after, Some((2, 2)));

        let lease = store.lease_writer().await?.expect("direct");
        let mut tx = lease.begin()?;
        WriteTx::Direct(&mut tx).execute(insert, &[Param::Str("gone"), Param::Str("1")]).now_or_never().expect("ready at once")?;
        drop(tx);
        drop(lease);
        assert_eq!(store.setting("gone").await?, None, "dropped without a commit: rolled back");
        sqlx::query(insert).bind("c").bind("1").execute(&store.pool).await?;
        Ok(())
    }

    /// The checkpoint's writer-side step waits for a held lease and says so, so the
    /// request-end writer can give the lease back after its batch.
    #[tokio::test]
    async fn a_checkpoint_waiting_for_the_writer_marks_the_lease_wanted() -> Result<(), sqlx::Error> {
        let dir = tempfile::tempdir().map_err(sqlx::Error::Io)?;
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await?;
        let lease = store.lease_writer().await?.expect("a file database has a direct connection");
        assert!(!lease.wanted());
        let checkpoint = tokio::spawn({
            let store = store.clone();
            async move { store.checkpoint().await }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !lease.wanted() {
            assert!(std::time::Instant::now() < deadline, "the checkpoint never asked for the writer");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(!checkpoint.is_finished(), "the checkpoint waits while the lease is held");
        drop(lease);
        let frames = checkpoint.await.map_err(|e| sqlx::Error::Protocol(e.to_string()))??;
        assert!(frames.is_some());
        let again = store.lease_writer().await?.expect("direct");
        assert!(!again.wanted(), "nobody waits once the checkpoint has the writer");
        Ok(())
    }

    /// A writer that commits without pause, with a reader beside it: each checkpoint
    /// leaves the WAL to start over, so it never holds more than a few intervals of
    /// commits. (With the reader's checkpoint alone it held every commit ever made.)
    #[tokio::test]
    async fn the_wal_starts_over_under_a_writer_that_never_pauses() -> Result<(), sqlx::Error> {
        let dir = tempfile::tempdir().map_err(sqlx::Error::Io)?;
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let writing = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut commits = 0u64;
                while !stop.is_cancelled() {
                    sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
                        .bind(format!("k{commits}"))
                        .bind("x".repeat(1000))
                        .execute(&store.pool)
                        .await?;
                    commits += 1;
                }
                Ok::<u64, sqlx::Error>(commits)
            })
        };
        let mut frames = Vec::new();
        for _ in 0..16 {
            tokio::time::sleep(std::time::Duration::from_millis(60)).await;
            let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM settings").fetch_one(&store.read).await?;
            frames.push(store.checkpoint().await?.unwrap_or_default().0);
        }
        stop.cancel();
        let commits = writing.await.map_err(|e| sqlx::Error::Protocol(e.to_string()))??;
        let last = frames.last().copied().unwrap_or(0);
        assert!(commits > 200, "the writer committed {commits} times");
        // Every commit appends at least one frame, so a WAL that never started over
        // would hold at least `commits` frames.
        assert!(
            last < i64::try_from(commits).unwrap_or(i64::MAX) / 2,
            "the WAL holds {last} frames after {commits} commits (frames at each checkpoint: {frames:?})"
        );
        Ok(())
    }
}
