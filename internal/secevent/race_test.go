//go:build race

package secevent_test

func init() { raceEnabled = true }
