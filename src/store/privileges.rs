//! What the serving role may do in the database: granted by `migrate` (run
//! as the schema's owner) and checked by readiness, from this one list, so
//! that a role without them is told by an unready pod and a logged cause
//! rather than by `INTERNAL` on every call.

use sqlx::{PgConnection, PgPool};

/// Each table (and the one sequence) the service touches, and what it does
/// there. The event tables are written by the link triggers, which run as
/// the caller.
pub const NEEDED: &[(&str, &[&str])] = &[
    ("identities", &["SELECT", "INSERT", "UPDATE"]),
    ("mailboxes", &["SELECT", "INSERT", "UPDATE"]),
    ("phone_numbers", &["SELECT", "INSERT", "UPDATE"]),
    // Retention deletes old events.
    ("assignment_events", &["SELECT", "INSERT", "DELETE"]),
    ("event_sequences", &["SELECT", "INSERT", "UPDATE"]),
    // A sequence: UPDATE lets the triggers take numbers (nextval), SELECT
    // lets the events-written metric read how many were taken.
    ("assignment_event_numbers", &["SELECT", "UPDATE"]),
    ("event_relay_positions", &["SELECT", "INSERT", "UPDATE"]),
];

/// Grants `role` exactly what the service needs; nothing when `role` is the
/// connected (owning) role itself. Idempotent: every release's `migrate`
/// runs it, so a table a migration adds is granted in the same release.
pub async fn grant_to(pool: &PgPool, role: &str) -> anyhow::Result<Granted> {
    let (exists, is_self): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1), $1 = current_user",
    )
    .bind(role)
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        exists,
        "DATABASE_APP_ROLE {role:?} does not exist: create it (CREATE ROLE … LOGIN) first"
    );
    if is_self {
        return Ok(Granted::SameRole);
    }
    // The schema the migrations created their tables in.
    let grant: String = sqlx::query_scalar(
        "SELECT format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), $1::text)",
    )
    .bind(role)
    .fetch_one(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(grant))
        .execute(pool)
        .await?;
    for (table, privileges) in NEEDED {
        // `format('%I')` quotes the names; the privileges are this list's.
        let grant: String = sqlx::query_scalar(
            "SELECT format('GRANT %s ON TABLE %I TO %I', $1::text, $2::text, $3::text)",
        )
        .bind(privileges.join(", "))
        .bind(table)
        .bind(role)
        .fetch_one(pool)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(grant))
            .execute(pool)
            .await?;
    }
    Ok(Granted::Granted)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Granted {
    Granted,
    /// The service and the migrations use the same role: it owns the tables.
    SameRole,
}

/// The privileges of `NEEDED` the connected role lacks, as `"UPDATE on
/// identities"`; empty when it has them all. A missing table is an error
/// (the schema is not migrated).
pub async fn missing(connection: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    let (tables, privileges): (Vec<&str>, Vec<&str>) = NEEDED
        .iter()
        .flat_map(|(table, privileges)| {
            privileges.iter().map(move |privilege| (*table, *privilege))
        })
        .unzip();
    sqlx::query_scalar(
        "SELECT privilege || ' on ' || tbl
         FROM unnest($1::text[], $2::text[]) AS needed (tbl, privilege)
         WHERE NOT has_table_privilege(tbl, privilege)",
    )
    .bind(tables)
    .bind(privileges)
    .fetch_all(connection)
    .await
}
