-- Read model of the workspace aggregates, kept by the `provisioner-workspaces`
-- projection from the K8SHELL_WORKSPACE stream. Rebuildable: never the source
-- of truth.
CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    username    text NOT NULL,
    blueprint   text NOT NULL,
    state       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    -- Stream sequence of the `requested` event: a stable, unique creation order.
    created_seq bigint NOT NULL,
    -- Stream sequence of the last event applied to this row.
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE INDEX workspaces_by_user ON workspaces (username, created_seq DESC);
CREATE INDEX workspaces_by_creation ON workspaces (created_seq DESC);
