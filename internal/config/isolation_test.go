package config

import (
	"strings"
	"testing"

	"github.com/metald/metald/internal/policy"
)

// isolation.management_access is loaded from the file, checked strictly
// by Validate (every bad rule named by its index and column) and parsed
// into rules.
func TestConfigManagementAccess(t *testing.T) {
	c, err := Load(writeFile(t, "metald.yaml", `isolation:
  management_access:
    - allow tcp from 2001:db8:ffff::/48 to any port 22
    - allow udp from any to 2001:db8:ffff::10 port 514
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	rules, err := ParseManagementAccess("isolation.management_access", c.Isolation.ManagementAccess)
	if err != nil || len(rules) != 2 || rules[0].Action != policy.ActionAllow || rules[0].Src.Prefix.String() != "2001:db8:ffff::/48" {
		t.Fatalf("rules %+v, %v", rules, err)
	}

	c.Isolation.ManagementAccess = []string{
		"allow tcp from 2001:db8:ffff::/48 to any port 22",                 // 0 fine
		"allow tcp form 2001:db8:ffff::/48 to any port 22",                 // 1 syntax
		"deny all from 2001:db8:bad::/48 to any",                           // 2 deny
		"allow tcp from any to any port 22",                                // 3 names no management side
		"allow tcp from sg:admins to any port 22",                          // 4 group: tenants choose membership
		"allow tcp from 2600:beef:1002:mgmt::/64 to any port 22",           // 5 symbolic
		"allow tcp from ::/0 to any port 22",                               // 6 ::/0 is any
		"allow tcp from 2001:db8:ffff::/48 to sg:web port 22",              // 7 group on the other side
		"allow tcp from 2001:db8:ffff::/48 to 2001:db8:1::/64 port 22 log", // 8 fine
	}
	err = c.Validate()
	if err == nil {
		t.Fatal("bad management rules validated")
	}
	want := []string{
		`isolation.management_access[1]: col 11: expected "from", got "form"`,
		`isolation.management_access[2]: col 1: "deny": only allow rules belong here`,
		`isolation.management_access[3]: col 16: the rule must name the management hosts`,
		`isolation.management_access[4]: col 16: "sg:admins": security groups are not allowed here`,
		`isolation.management_access[5]: col 16: "2600:beef:1002:mgmt::/64": symbolic subnet names are not allowed here`,
		`isolation.management_access[6]: col 16: the rule must name the management hosts`,
		`isolation.management_access[7]: col 38: "sg:web": security groups are not allowed here`,
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != len(want) {
		t.Fatalf("got %d errors, want %d:\n%v", len(lines), len(want), err)
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("error %d:\n got %s\nwant %s...", i, lines[i], w)
		}
	}
	// A key of the section that does not exist is refused like any other.
	_, err = Load(writeFile(t, "metald.yaml", "isolation:\n  management_acess: []\n"))
	if err == nil || !strings.HasSuffix(err.Error(), `line 2: unknown key "isolation.management_acess"`) {
		t.Fatalf("unknown key: %v", err)
	}
	_, err = Load(writeFile(t, "metald.yaml", "isolation:\n  management_access: allow tcp from 2001:db8::/32 to any\n"))
	if err == nil || !strings.Contains(err.Error(), "isolation.management_access: want a list of strings") {
		t.Fatalf("string for list: %v", err)
	}
}
