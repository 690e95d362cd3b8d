# SSH Shield: when repeated SSH failures from one address become a ban, and
# for how long. Input: {ip, failures (in the window), offences (bans so
# far)}. Output: data.k8shell.shield.verdict = {ban, duration_seconds}.
package k8shell.shield

import rego.v1

# Failures within `window_seconds` that trigger a ban.
threshold := 4

# Repeat offenders (already banned before) are banned sooner.
repeat_threshold := 2

window_seconds := 300

# Ban lengths by offence: 1 m, 5 m, 15 m, 1 h, 6 h, 24 h, then 72 h.
schedule := [60, 300, 900, 3600, 21600, 86400, 259200]

# Never banned: loopback and the platform's own networks.
allowlist := ["127.0.0.0/8", "::1/128"]

offences := object.get(input, "offences", 0)

allowed if {
	some cidr in allowlist
	net.cidr_contains(cidr, input.ip)
}

limit := threshold if offences == 0

limit := repeat_threshold if offences > 0

duration := schedule[min([offences, count(schedule) - 1])]

default verdict := {"ban": false, "duration_seconds": 0, "window_seconds": 300}

verdict := {"ban": true, "duration_seconds": duration, "window_seconds": window_seconds} if {
	not allowed
	input.failures >= limit
}
