# Decision points by domain: user:*, token:*, ssh:*, session:*, workspace:*.
package k8shell.authz

import rego.v1

# ---- user ------------------------------------------------------------

# Users read and change their own profile, keys and password; admins
# anyone's (granted in authz.rego).
grants contains "own account" if {
	action in {"user:read", "user:write", "user:auth"}
	input.resource.id == subject.sub
}

# Anyone authenticated may check that a user exists (SSH user strings).
grants contains "existence checks are open" if action == "user:exists"

# Onboarding: self-service for identities from a configured provider;
# new users get no roles and no sudo unless an admin grants them.
grants contains "self-service onboarding" if {
	action == "user:onboard"
	context.provider != ""
}

obligations["roles"] := "" if action == "user:onboard"

obligations["sudo"] := "false" if {
	action == "user:onboard"
	not is_admin
}

# Logins: every method but `password` for users who have keys; the
# obligation tells the caller which methods to offer.
grants contains "authentication" if action == "user:auth"

obligations["auth_methods"] := "publickey,password,keyboard-interactive" if action == "user:auth"

# ---- token -----------------------------------------------------------

grants contains "own tokens" if {
	action in {"token:create", "token:read", "token:write", "token:delete"}
	input.resource.id == subject.sub
}

# Personal access tokens of non-admins live at most 90 days.
obligations["expires_in"] := "90d" if {
	action == "token:create"
	not is_admin
}

# ---- ssh (resource = workspace) ---------------------------------------

ssh_actions := {
	"ssh:shell", "ssh:exec", "ssh:sftp", "ssh:direct-tcpip",
	"ssh:direct-streamlocal", "ssh:agent-forward", "ssh:tcpip-forward",
}

grants contains "own workspace" if {
	action in ssh_actions
	is_owner
}

# Port forwarding reaches the workspace's loopback only (k8shelld refuses
# anything else too; the policy says so for the audit trail).
denials contains sprintf("forwarding to %s is not allowed", [host]) if {
	action == "ssh:direct-tcpip"
	host := object.get(context, "host", "")
	not host in {"localhost", "127.0.0.1", "::1"}
}

# ---- session ----------------------------------------------------------

grants contains "own workspace" if {
	action == "session:start"
	is_owner
}

# Recording: what a blueprint asks for (`record` attribute), else nothing.
obligations["record"] := object.get(attributes, "record", "none") if action == "session:start"

# Everyone may list sessions; non-admins only see their own.
grants contains "session listing" if action == "session:list"

obligations["username"] := subject.sub if {
	action == "session:list"
	not is_admin
}

# ---- workspace -------------------------------------------------------

workspace_actions := {
	"workspace:read", "workspace:delete", "workspace:connect",
	"workspace:files", "workspace:app", "workspace:start", "workspace:stop",
}

grants contains "own workspace" if {
	action in workspace_actions
	is_owner
}

# Creating and provisioning: users for themselves.
grants contains "own workspace" if {
	action in {"workspace:create", "workspace:provision"}
	object.get(attributes, "owner", subject.sub) == subject.sub
}

grants contains "workspace listing" if action == "workspace:list"

obligations["username"] := subject.sub if {
	action == "workspace:list"
	not is_admin
}

# Non-admins get at most 4 CPUs and 8 GiB, whatever the blueprint says.
obligations["patch:/resources/limits/cpu"] := "4" if {
	action == "workspace:provision"
	not is_admin
}

obligations["patch:/resources/limits/memory"] := "8Gi" if {
	action == "workspace:provision"
	not is_admin
}
