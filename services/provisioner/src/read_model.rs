//! Queries on the `workspaces` projection.

use sqlx::{PgPool, Row};

use crate::workspace::{State, Workspace};

/// Filters of a list query; empty strings match everything.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub username: String,
    pub blueprint: String,
    pub state: Option<State>,
    /// Only rows created before this creation sequence (keyset paging).
    pub before_seq: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "id, username, blueprint, state, reason, created_seq, version, created_at, \
                       updated_at, endpoint, stage, progress, splash";

fn from_row(row: &sqlx::postgres::PgRow) -> Result<(Workspace, i64), sqlx::Error> {
    let state: String = row.try_get("state")?;
    let workspace = Workspace {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        blueprint: row.try_get("blueprint")?,
        state: State::parse(&state)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown state {state:?}").into()))?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get::<i64, _>("version")? as u64,
        endpoint: row.try_get("endpoint")?,
        splash: row.try_get("splash")?,
        stage: row.try_get("stage")?,
        progress: row.try_get::<i16, _>("progress")?.clamp(0, 100) as u8,
        // The read model does not keep these; decisions load the aggregate.
        metadata: Default::default(),
        desired_running: false,
        stop_at: None,
    };
    Ok((workspace, row.try_get("created_seq")?))
}

/// One workspace by id.
pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Workspace>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM workspaces WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref()
        .map(|r| from_row(r).map(|(w, _)| w))
        .transpose()
}

/// Workspaces matching `filter`, newest first, with each one's creation sequence.
/// Deleted workspaces are listed only when asked for by state.
pub async fn list(
    pool: &PgPool,
    filter: &ListFilter,
) -> Result<Vec<(Workspace, i64)>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM workspaces
         WHERE ($1 = '' OR username = $1)
           AND ($2 = '' OR blueprint = $2)
           AND (($3::text IS NULL AND state <> 'deleted') OR state = $3)
           AND ($4::bigint IS NULL OR created_seq < $4)
         ORDER BY created_seq DESC
         LIMIT $5"
    ))
    .bind(&filter.username)
    .bind(&filter.blueprint)
    .bind(filter.state.map(State::as_str))
    .bind(filter.before_seq)
    .bind(filter.limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}
