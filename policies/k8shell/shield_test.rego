package k8shell.shield_test

import rego.v1

import data.k8shell.shield

verdict(ip, failures, offences) := v if {
	v := shield.verdict with input as {"ip": ip, "failures": failures, "offences": offences}
}

test_four_failures_ban_for_a_minute if {
	not verdict("192.0.2.7", 3, 0).ban
	verdict("192.0.2.7", 4, 0) == {"ban": true, "duration_seconds": 60, "window_seconds": 300}
}

test_bans_escalate_and_repeat_offenders_are_banned_sooner if {
	verdict("192.0.2.7", 2, 1).duration_seconds == 300
	verdict("192.0.2.7", 2, 2).duration_seconds == 900
	verdict("192.0.2.7", 2, 6).duration_seconds == 259200
	verdict("192.0.2.7", 2, 40).duration_seconds == 259200
	not verdict("192.0.2.7", 1, 3).ban
}

test_ipv6_and_the_allowlist if {
	verdict("2001:db8::1", 4, 0).ban
	not verdict("127.0.0.1", 100, 5).ban
	not verdict("::1", 100, 0).ban
}
