use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Failure to prepare a service's database pool.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The URL does not parse.
    #[error("invalid database url")]
    Url(#[source] sqlx::Error),
    /// The schema name is not a plain identifier.
    #[error("invalid schema name {0:?}")]
    Schema(String),
    /// Connecting or creating the schema failed.
    #[error("cannot prepare schema {schema}")]
    Connect {
        /// Schema being prepared.
        schema: String,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
}

/// Connects a pool whose `search_path` is the service's own schema, creating
/// the schema first.
///
/// Services never share tables: each one's tables, its migration history and
/// its projection offsets live in its schema, so unqualified names in its
/// SQL resolve there and nowhere else.
pub async fn connect_schema(
    url: &str,
    schema: &str,
    max_connections: u32,
) -> Result<PgPool, PostgresError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(PostgresError::Schema(schema.to_owned()));
    }
    let base = PgConnectOptions::from_str(url).map_err(PostgresError::Url)?;
    let connect_error = |source| PostgresError::Connect {
        schema: schema.to_owned(),
        source,
    };
    let mut connection = base.connect().await.map_err(connect_error)?;
    // The name was validated above as a plain lowercase identifier.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut connection)
        .await
        .map_err(connect_error)?;
    connection.close().await.map_err(connect_error)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(base.options([("search_path", schema)]))
        .await
        .map_err(connect_error)
}
