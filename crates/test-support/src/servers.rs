//! The database servers the tests use: their URLs from the environment (`scripts/db-up.sh`
//! exports them), a fresh database per test, and sessions in the mode `dap` uses.

/// The base URL of the PostgreSQL server the tests use (`scripts/db-up.sh` exports it); a test
/// asks [`targets::require`] first, so a missing server is skipped or failed by the one rule,
/// never replaced by a guessed address.
pub fn postgres_url() -> String {
    std::env::var("TEST_POSTGRES_URL").expect("TEST_POSTGRES_URL is set (ask targets::require first)")
}

/// The base URL of the MariaDB server the tests use; see [`postgres_url`].
pub fn mysql_url() -> String {
    std::env::var("TEST_MYSQL_URL").expect("TEST_MYSQL_URL is set (ask targets::require first)")
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, db: &str) -> String {
    let (url, query) = url.split_once('?').map_or((url, String::new()), |(u, q)| (u, format!("?{q}")));
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}{query}")
}

/// A new, empty PostgreSQL database for one test; returns its URL and a connection.
pub async fn fresh_postgres(name: &str) -> (String, tokio_postgres::Client) {
    let admin_url = postgres_url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {admin_url} ({e}): run scripts/db-up.sh"));
    tokio::spawn(conn);
    let db = format!("dapt_{name}");
    // Two statements: a multi-statement batch is one transaction, which DROP DATABASE refuses.
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.expect("drop old test database");
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.expect("create test database");
    let url = with_database(&admin_url, &db);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect to test database");
    tokio::spawn(conn);
    (url, client)
}

/// Runs SQL on MariaDB/MySQL through the `mariadb` command-line client; returns tab-separated rows.
pub async fn mysql_query(db: Option<&str>, sql: &str) -> Vec<Vec<String>> {
    let url = mysql_url();
    let rest = url.strip_prefix("mysql://").expect("mysql:// URL");
    let (cred, hostdb) = rest.split_once('@').expect("user:pass@host");
    let (user, pass) = cred.split_once(':').expect("user:pass");
    let (hostport, _) = hostdb.split_once('/').expect("host/db");
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
    let mut cmd = tokio::process::Command::new("mariadb");
    cmd.args(["-N", "-B", "--raw", "-h", host, "-P", port, "-u", user]).arg(format!("-p{pass}"));
    if let Some(db) = db {
        cmd.arg(db);
    }
    let out = cmd.arg("-e").arg(sql).output().await.expect("the mariadb client runs (scripts/db-up.sh installs it)");
    assert!(out.status.success(), "mariadb {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').map(String::from).collect()).collect()
}

/// A new, empty MariaDB database; returns its URL.
pub async fn fresh_mysql(name: &str) -> String {
    let db = format!("dapt_{name}");
    mysql_query(
        None,
        &format!("DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"),
    )
    .await;
    with_database(&mysql_url(), &db)
}

/// A connection pool to a MariaDB database, in the session mode dap uses.
pub fn mysql_pool(url: &str) -> mysql_async::Pool {
    let opts = mysql_async::Opts::from_url(url).expect("a mysql:// URL");
    let opts = mysql_async::OptsBuilder::from_opts(opts)
        .setup(vec!["SET SESSION sql_mode = 'ANSI_QUOTES'", "SET SESSION time_zone = '+00:00'"]);
    mysql_async::Pool::new(opts)
}
