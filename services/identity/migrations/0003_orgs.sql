-- Organisations (projection-owned, rebuildable from the user stream).
ALTER TABLE users ADD COLUMN organization text NOT NULL DEFAULT 'default';

CREATE TABLE orgs (
    name        text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL
);
