package netns

// Exposed to the package's tests.
var (
	Inet6Conf      = inet6Conf
	DevconfIndex   = devconfIndex
	ChangedSysctls = changedSysctls
)
