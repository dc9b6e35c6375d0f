//! The database backend the end-to-end tests and the Rust conformance driver run on, chosen by
//! `JOBPLANE_TEST_BACKEND`: `sqlite` (the default; a file in the test's temp directory) or
//! `postgres` (a database of the test's own, `jp_e2e_<uuid>`, created on the server
//! `JOBPLANE_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`, and dropped with
//! `WITH (FORCE)` when the test is done with it, also when it panics).
//!
//! When PostgreSQL is asked for and cannot be reached, a test says "skipping: …" and passes
//! (it exits its process with status 0, which is one test under cargo-nextest), except under
//! `CI=true`, where it fails; so does it outside nextest, where exiting would end every test of
//! the binary at once.

use std::path::Path;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

/// The variable that chooses the backend.
pub const BACKEND_VAR: &str = "JOBPLANE_TEST_BACKEND";

/// Where the databases are created under [`Backend::Postgres`].
pub const POSTGRES_VAR: &str = "JOBPLANE_TEST_POSTGRES";

/// A database backend of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://DIR/jobplane.db`.
    Sqlite,
    /// `postgres://…/jp_e2e_<uuid>`.
    Postgres,
}

impl Backend {
    /// The backend `JOBPLANE_TEST_BACKEND` names (`sqlite` when unset or empty).
    pub fn from_env() -> Backend {
        match std::env::var(BACKEND_VAR).as_deref() {
            Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
            Ok("postgres") => Backend::Postgres,
            Ok(other) => panic!("{BACKEND_VAR}={other:?}: expected `sqlite` or `postgres`"),
        }
    }
}

/// The PostgreSQL server the tests create their databases on.
pub fn postgres_server() -> String {
    std::env::var(POSTGRES_VAR)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A test's data: a temp directory and the database a server of the test uses — `jobplane.db`
/// in the directory with SQLite, a database of its own with PostgreSQL. Both go when this value
/// is dropped; servers restarted on it (kill -9, SIGTERM, [`crate::TestServer::restart`]) find
/// the same database.
pub struct TestDir {
    dir: tempfile::TempDir,
    db_url: String,
    _postgres: Option<PgDatabase>,
}

impl TestDir {
    /// A fresh directory and database on the backend `JOBPLANE_TEST_BACKEND` names.
    pub async fn new() -> TestDir {
        let dir = tempfile::tempdir().expect("temp dir");
        match Backend::from_env() {
            Backend::Sqlite => TestDir {
                db_url: sqlite_url(dir.path()),
                dir,
                _postgres: None,
            },
            Backend::Postgres => {
                let db = PgDatabase::create().await;
                TestDir {
                    db_url: db.url.clone(),
                    dir,
                    _postgres: Some(db),
                }
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The database URL, for `store::open` or `jobplane serve --db`.
    pub fn db_url(&self) -> &str {
        &self.db_url
    }
}

/// `sqlite://DIR/jobplane.db`.
pub(crate) fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("jobplane.db").display())
}

/// A database of one test on the PostgreSQL server, dropped with this value.
pub(crate) struct PgDatabase {
    /// Its URL.
    pub(crate) url: String,
    name: String,
    server: String,
}

impl PgDatabase {
    /// Creates `jp_e2e_<uuid>`; when the server cannot be reached, skips the test (see the
    /// module's documentation) and does not return.
    pub(crate) async fn create() -> PgDatabase {
        let server = postgres_server();
        match PgDatabase::create_on(&server, "jp_e2e").await {
            Ok(db) => db,
            Err(why) => unreachable_server(&server, &why),
        }
    }

    /// Creates `<prefix>_<uuid>` on the server at `server`; `Err` when it cannot be reached.
    pub(crate) async fn create_on(server: &str, prefix: &str) -> Result<PgDatabase, String> {
        let mut admin = admin_connection(server).await?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {server}: {e}"));
        let _ = admin.close().await;
        Ok(PgDatabase {
            url: database_url(server, &name),
            name,
            server: server.to_owned(),
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside the test's runtime (and cannot await): a thread with a runtime of
        // its own does the I/O, and the drop waits for it.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut admin = admin_connection(&server).await?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop database {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop database {}: the dropping thread panicked",
                self.name
            ),
        }
    }
}

async fn admin_connection(server: &str) -> Result<PgConnection, String> {
    match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(server)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5s".into()),
    }
}

/// The rule for a PostgreSQL server that does not answer: fail under `CI=true`; skip (exit 0,
/// after saying why) when the test has a process of its own (cargo-nextest); fail otherwise.
fn unreachable_server(server: &str, why: &str) -> ! {
    let what = format!(
        "{BACKEND_VAR}=postgres but no PostgreSQL at {server} ({why}); start it, set \
         {POSTGRES_VAR}, or unset {BACKEND_VAR}"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("cannot run under CI=true: {what}");
    }
    if std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|m| m == "process-per-test") {
        eprintln!("skipping: {what}");
        std::process::exit(0);
    }
    panic!(
        "{what} (a test skips itself only under cargo-nextest, where it has a process of its own)"
    );
}

/// `server` (a `postgres://` URL) with its database replaced by `database`; the query is kept.
fn database_url(server: &str, database: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut url = format!("{}/{database}", &base[..path]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/test", "jp"),
            "postgres://postgres@127.0.0.1:5432/jp"
        );
        assert_eq!(
            database_url("postgres://u:p@h/test?sslmode=disable", "jp"),
            "postgres://u:p@h/jp?sslmode=disable"
        );
        assert_eq!(
            database_url("postgresql://h:5432", "jp"),
            "postgresql://h:5432/jp"
        );
        assert_eq!(
            database_url("postgres://h?x=1", "jp"),
            "postgres://h/jp?x=1"
        );
    }
}
