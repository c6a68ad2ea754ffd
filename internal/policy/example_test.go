package policy_test

import (
	"fmt"
	"net/netip"

	"github.com/metald/metald/internal/policy"
)

func Example() {
	rules, err := policy.ParseList("security_policy.ingress_rules", []string{
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any",
		"allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22",
		"deny all from any to any",
	}, policy.ParseOptions{})
	if err != nil {
		panic(err)
	}
	fmt.Println(rules[1].String(), rules[1].Src.Symbolic, rules[1].Src.Resolved())

	// Labels are resolved outside the package.
	rules, err = policy.Resolve(rules, policy.Resolver{
		Prefix: func(text string) (netip.Prefix, error) {
			return netip.ParsePrefix("2600:beef:1000:ff::/64")
		},
	})
	if err != nil {
		panic(err)
	}
	fmt.Println(policy.Match(rules, policy.Packet{
		Proto:   policy.ProtoTCP,
		Src:     netip.MustParseAddr("2600:beef:1000:ff::7"),
		Dst:     netip.MustParseAddr("2600:beef:1000:1::10"),
		SrcPort: 50000,
		DstPort: 22,
	}))

	_, err = policy.ParseList("security_policy.ingress_rules", []string{
		"allow tcp from any to any port 80",
		"allow icmpv6 type echo-requst from any to any",
	}, policy.ParseOptions{})
	fmt.Println(err)
	// Output:
	// allow tcp from 2600:beef:1000:mgmt::/64 to any port 22 true false
	// 1 true
	// security_policy.ingress_rules[1]: col 19: unknown icmpv6 type "echo-requst" (did you mean "echo-request"?)
}
