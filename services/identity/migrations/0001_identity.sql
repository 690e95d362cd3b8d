-- Read model of the user aggregates, kept by the `identity-users`
-- projection from the K8SHELL_USER stream. Rebuildable.
CREATE TABLE users (
    username     text PRIMARY KEY,
    email        text NOT NULL DEFAULT '',
    display_name text NOT NULL DEFAULT '',
    roles        text[] NOT NULL DEFAULT '{}',
    origin       text NOT NULL,
    has_password boolean NOT NULL DEFAULT false,
    locked_until timestamptz,
    created_at   timestamptz NOT NULL,
    version      bigint NOT NULL
);

CREATE TABLE ssh_keys (
    username    text NOT NULL,
    fingerprint text NOT NULL,
    algorithm   text NOT NULL,
    comment     text NOT NULL DEFAULT '',
    public_key  text NOT NULL,
    added_at    timestamptz NOT NULL,
    PRIMARY KEY (username, fingerprint)
);
CREATE INDEX ssh_keys_by_fingerprint ON ssh_keys (fingerprint);

CREATE TABLE pats (
    id         text PRIMARY KEY,
    username   text NOT NULL,
    name       text NOT NULL,
    scopes     text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked    boolean NOT NULL DEFAULT false
);
CREATE INDEX pats_by_user ON pats (username);

-- Identity's own state: secrets and counters that never go on the bus.
-- Not rebuildable from events.
CREATE TABLE password_hashes (
    username   text PRIMARY KEY,
    hash       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pat_secrets (
    id           text PRIMARY KEY,
    username     text NOT NULL,
    hash         bytea NOT NULL,
    last_used_at timestamptz
);

CREATE TABLE login_failures (
    username text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    source   text NOT NULL DEFAULT ''
);
CREATE INDEX login_failures_by_user ON login_failures (username, at);

-- Signing keys, private halves encrypted with the key-encryption key.
CREATE TABLE signing_keys (
    kid         text PRIMARY KEY,
    private_key bytea NOT NULL,
    public_jwk  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Set when a newer key took over signing.
    retired_at  timestamptz,
    -- After this the key no longer verifies (retired_at + longest token life).
    expires_at  timestamptz
);

-- Other secrets (the SSH user CA), encrypted.
CREATE TABLE secrets (
    name       text PRIMARY KEY,
    value      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
