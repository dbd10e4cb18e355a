//! The makima_keys client scenario through tokio-postgres, the way a Rust
//! service calls the extension.
//!
//!     makima-client scenario | issue USER_ID | verify KEY [KEY ...]
//!
//! Connection from PGHOST, PGPORT, PGUSER, PGDATABASE; the scenario's no-grant
//! step connects as MK_NOGRANT_ROLE. Every value is a bind parameter: keys
//! never appear in SQL text.

use std::env;
use std::fmt;
use std::future::Future;
use std::process::ExitCode;

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls};
use uuid::Uuid;

const USAGE: &str = "usage: makima-client scenario | issue USER_ID | verify KEY [KEY ...]";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("scenario") if args.len() == 1 => {
            return match scenario().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(Failure { step, detail }) => {
                    println!("FAIL {step}: {detail}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("issue") if args.len() == 2 => issue(&args[1]).await,
        Some("verify") => verify_keys(&args[1..]).await,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Detail(detail)) => {
            eprintln!("error: {detail}");
            ExitCode::FAILURE
        }
    }
}

/// Why a step failed. Built from our own text or from a database error's
/// SQLSTATE and message, so it never carries a key.
#[derive(Debug)]
struct Detail(String);

impl From<tokio_postgres::Error> for Detail {
    fn from(e: tokio_postgres::Error) -> Self {
        // A DbError's Display can include DETAIL/HINT lines; code and message
        // are enough here and keep the report to one line.
        Detail(match e.as_db_error() {
            Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
            // "error connecting to server" alone does not say why: add the cause.
            None => match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        })
    }
}

impl From<&str> for Detail {
    fn from(s: &str) -> Self {
        Detail(s.to_owned())
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The first scenario step that failed.
struct Failure {
    step: &'static str,
    detail: Detail,
}

/// Runs one scenario step, printing `ok <name>` when it passes so the output
/// shows how far the scenario got.
async fn step<T>(
    name: &'static str,
    body: impl Future<Output = Result<T, Detail>>,
) -> Result<T, Failure> {
    let value = body
        .await
        .map_err(|detail| Failure { step: name, detail })?;
    println!("ok {name}");
    Ok(value)
}

fn ensure(condition: bool, detail: &str) -> Result<(), Detail> {
    if condition {
        Ok(())
    } else {
        Err(detail.into())
    }
}

/// Connection settings from the libpq variables, with the same defaults as
/// the other clients. `user` overrides PGUSER for the no-grant connection.
fn config(user: Option<&str>) -> Result<Config, Detail> {
    let var = |name: &str, default: &str| env::var(name).unwrap_or_else(|_| default.to_owned());
    let port = var("PGPORT", "5432");
    let port: u16 = port
        .parse()
        .map_err(|_| Detail(format!("PGPORT is not a port number: {port:?}")))?;
    let mut config = Config::new();
    config
        .host(var("PGHOST", "127.0.0.1"))
        .port(port)
        .user(user.map_or_else(|| var("PGUSER", "postgres"), str::to_owned))
        .dbname(var("PGDATABASE", "postgres"));
    Ok(config)
}

async fn connect(user: Option<&str>) -> Result<Client, Detail> {
    let (client, connection) = config(user)?.connect(NoTls).await?;
    // tokio-postgres drives the socket in a separate task; the client's
    // queries fail with a closed-connection error if it stops.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection error: {e}");
        }
    });
    Ok(client)
}

/// Lower-case hex SHA-256 of the key's UTF-8 bytes, as the extension stores it.
fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

async fn verify(client: &Client, key: &str) -> Result<Option<Uuid>, Detail> {
    let row = client.query_one("SELECT mk_verify($1)", &[&key]).await?;
    Ok(row.get(0))
}

async fn status(client: &Client, key: &str) -> Result<String, Detail> {
    let row = client
        .query_one("SELECT status FROM mk_verify_detail($1)", &[&key])
        .await?;
    Ok(row.get(0))
}

/// Runs a statement that must fail with `expected`; anything else is the detail.
async fn expect_sqlstate(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    expected: &SqlState,
) -> Result<(), Detail> {
    match client.execute(sql, params).await {
        // Say only that it succeeded: the rows would hold a key.
        Ok(_) => Err(Detail(format!(
            "succeeded, expected SQLSTATE {}",
            expected.code()
        ))),
        Err(e) if e.code() == Some(expected) => Ok(()),
        Err(e) => Err(Detail(format!(
            "expected SQLSTATE {}, got {}",
            expected.code(),
            Detail::from(e)
        ))),
    }
}

async fn scenario() -> Result<(), Failure> {
    // Connecting is part of the first step, so a server that is not there
    // is reported as a failed step like any other.
    let (client, user): (Client, Uuid) = step("user", async {
        let client = connect(None).await?;
        let row = client
            .query_one(
                "INSERT INTO users (email) VALUES ($1) RETURNING id",
                &[&"tokio-postgres@example.com"],
            )
            .await?;
        Ok((client, row.get(0)))
    })
    .await?;
    let client = &client;

    let (key_id, key) = step("issue", async {
        let row = client
            .query_one(
                "SELECT id, key, key_prefix FROM mk_issue_key($1, $2)",
                &[&user, &"client-rust"],
            )
            .await?;
        let (id, key, prefix): (Uuid, String, String) = (row.get(0), row.get(1), row.get(2));
        ensure(key.len() == 52, "key is not 52 characters long")?;
        ensure(key.starts_with("mk_"), "key does not start with mk_")?;
        ensure(
            key.get(..9) == Some(prefix.as_str()),
            "key_prefix is not the key's first 9 characters",
        )?;
        Ok((id, key))
    })
    .await?;

    step("hash", async {
        let row = client
            .query_one(
                "SELECT key_hash::text FROM api_keys WHERE id = $1",
                &[&key_id],
            )
            .await?;
        let stored: String = row.get(0);
        ensure(
            stored == sha256_hex(&key),
            "stored key_hash differs from the client's SHA-256",
        )
    })
    .await?;

    step("verify good", async {
        ensure(
            verify(client, &key).await? == Some(user),
            "mk_verify did not return the user",
        )
    })
    .await?;

    step("verify bad", async {
        // One changed character breaks the key's checksum, so it is malformed
        // rather than merely unknown.
        let mut chars: Vec<char> = key.chars().collect();
        chars[10] = if chars[10] == 'a' { 'b' } else { 'a' };
        let bad: String = chars.into_iter().collect();
        ensure(
            verify(client, &bad).await?.is_none(),
            "mk_verify accepted an altered key",
        )?;
        let status = status(client, &bad).await?;
        ensure(
            status == "malformed",
            &format!("status {status:?}, expected \"malformed\""),
        )
    })
    .await?;

    step("verify unknown", async {
        ensure(
            verify(client, "not-a-key").await?.is_none(),
            "mk_verify accepted 'not-a-key'",
        )?;
        let status = status(client, "not-a-key").await?;
        ensure(
            status == "not_found",
            &format!("status {status:?}, expected \"not_found\""),
        )
    })
    .await?;

    step(
        "duplicate issue",
        expect_sqlstate(
            client,
            "SELECT * FROM mk_issue_key($1)",
            &[&user],
            &SqlState::UNIQUE_VIOLATION,
        ),
    )
    .await?;

    let new_key = step("rotate", async {
        let row = client
            .query_one("SELECT key FROM mk_rotate_key($1)", &[&user])
            .await?;
        let new_key: String = row.get(0);
        ensure(
            verify(client, &key).await?.is_none(),
            "the rotated-out key still verifies",
        )?;
        let status = status(client, &key).await?;
        ensure(
            status == "revoked",
            &format!("old key status {status:?}, expected \"revoked\""),
        )?;
        ensure(
            verify(client, &new_key).await? == Some(user),
            "the new key does not verify to the user",
        )?;
        Ok(new_key)
    })
    .await?;

    step("revoke", async {
        // Find the key by its hash, as a service holding only the key would.
        let row = client
            .query_one(
                "SELECT id FROM api_keys WHERE key_hash = $1",
                &[&sha256_hex(&new_key)],
            )
            .await?;
        let id: Uuid = row.get(0);
        let revoke = "SELECT mk_revoke($1)";
        let first: bool = client.query_one(revoke, &[&id]).await?.get(0);
        ensure(first, "first mk_revoke returned false")?;
        let second: bool = client.query_one(revoke, &[&id]).await?.get(0);
        ensure(!second, "second mk_revoke returned true")?;
        ensure(
            verify(client, &new_key).await?.is_none(),
            "the revoked key still verifies",
        )
    })
    .await?;

    step("no grant", async {
        let role = env::var("MK_NOGRANT_ROLE").map_err(|_| "MK_NOGRANT_ROLE is not set")?;
        let nogrant = connect(Some(&role)).await?;
        expect_sqlstate(
            &nogrant,
            "SELECT * FROM mk_issue_key($1)",
            &[&Uuid::new_v4()],
            &SqlState::INSUFFICIENT_PRIVILEGE,
        )
        .await
    })
    .await?;

    Ok(())
}

async fn issue(user: &str) -> Result<(), Detail> {
    let user = Uuid::parse_str(user).map_err(|e| Detail(format!("USER_ID is not a uuid: {e}")))?;
    let client = connect(None).await?;
    let row = client
        .query_one("SELECT key FROM mk_issue_key($1)", &[&user])
        .await?;
    let key: String = row.get(0);
    println!("{key}");
    Ok(())
}

async fn verify_keys(keys: &[String]) -> Result<(), Detail> {
    let client = connect(None).await?;
    for key in keys {
        match verify(&client, key).await? {
            Some(user) => println!("{user}"),
            None => println!("null"),
        }
    }
    Ok(())
}
