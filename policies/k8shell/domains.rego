# Decision points by domain: user:*, token:*, ssh:*, session:*, workspace:*.
# Each domain defines `grants(domain)` (a set of reasons),
# `obligations(domain)` (an object, when it has some for the action) and,
# where it vetoes, `denials(domain)` (a set of reasons).
package k8shell.authz

import rego.v1

# ---- user ------------------------------------------------------------

grants("user") := (
	# Users read and change their own profile, keys and password; admins
	# anyone's (granted in authz.rego).
	{"own account" |
		input.action in {"user:read", "user:write", "user:auth"}
		input.resource.id == input.subject.sub
	} |
	# Anyone authenticated may check that a user exists (SSH user strings).
	{"existence checks are open" | input.action == "user:exists"} |
	# Onboarding: self-service for identities from a configured provider.
	{"self-service onboarding" |
		input.action == "user:onboard"
		object.get(input.context, "provider", "") != ""
	} |
	{"authentication" | input.action == "user:auth"}
)

# New users get no roles and no sudo unless an admin grants them.
obligations("user") := {"roles": "", "sudo": "false"} if {
	input.action == "user:onboard"
	not admin(input.subject)
}

obligations("user") := {"roles": ""} if {
	input.action == "user:onboard"
	admin(input.subject)
}

# Logins: the methods the caller may offer.
obligations("user") := {"auth_methods": "publickey,password,keyboard-interactive"} if input.action == "user:auth"

# ---- token -----------------------------------------------------------

grants("token") := {"own tokens" |
	input.action in {"token:create", "token:read", "token:write", "token:delete"}
	input.resource.id == input.subject.sub
}

# Personal access tokens of non-admins live at most 90 days.
obligations("token") := {"expires_in": "90d"} if {
	input.action == "token:create"
	not admin(input.subject)
}

# ---- ssh (resource = workspace) ---------------------------------------

grants("ssh") := {"own workspace" |
	input.action in {
		"ssh:shell", "ssh:exec", "ssh:sftp", "ssh:direct-tcpip",
		"ssh:direct-streamlocal", "ssh:agent-forward", "ssh:tcpip-forward",
	}
	owns(input.subject, input.resource)
}

# Port forwarding reaches the workspace's loopback only (k8shelld refuses
# anything else too; the policy says so for the audit trail).
denials("ssh") := {sprintf("forwarding to %s is not allowed", [host]) |
	input.action == "ssh:direct-tcpip"
	host := object.get(input.context, "host", "")
	not host in {"localhost", "127.0.0.1", "::1"}
}

# ---- session ----------------------------------------------------------

grants("session") := {"own workspace" | input.action == "session:start"; owns(input.subject, input.resource)} | {"session listing" | input.action == "session:list"}

# Recording: what the workspace's blueprint asks for (its `recording`,
# passed as the `record` attribute), else nothing. To record more (say,
# every session of contractors), change this rule.
obligations("session") := {"record": object.get(input.resource.attributes, "record", "none")} if input.action == "session:start"

# Everyone may list sessions; non-admins only see their own.
obligations("session") := {"username": input.subject.sub} if {
	input.action == "session:list"
	not admin(input.subject)
}

# ---- workspace -------------------------------------------------------

grants("workspace") := (
	{"own workspace" |
		input.action in {
			"workspace:read", "workspace:delete", "workspace:connect",
			"workspace:files", "workspace:app", "workspace:start", "workspace:stop",
		}
		owns(input.subject, input.resource)
	} |
	# Creating and provisioning: users for themselves.
	{"own workspace" |
		input.action in {"workspace:create", "workspace:provision"}
		object.get(input.resource.attributes, "owner", input.subject.sub) == input.subject.sub
	} |
	{"workspace listing" | input.action == "workspace:list"}
)

obligations("workspace") := {"username": input.subject.sub} if {
	input.action == "workspace:list"
	not admin(input.subject)
}

# Non-admins get at most 4 CPUs and 8 GiB, whatever the blueprint says.
obligations("workspace") := {
	"patch:/resources/limits/cpu": "4",
	"patch:/resources/limits/memory": "8Gi",
} if {
	input.action == "workspace:provision"
	not admin(input.subject)
}
