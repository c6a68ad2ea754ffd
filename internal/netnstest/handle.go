package netnstest

import "github.com/vishvananda/netns"

func newNsHandle(fd int) netns.NsHandle { return netns.NsHandle(fd) }
