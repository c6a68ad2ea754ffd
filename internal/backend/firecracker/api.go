package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Firecracker API request bodies (the shapes of firecracker's swagger
// definition, only the fields metald sets).
type (
	machineConfig struct {
		VCPUCount  int32 `json:"vcpu_count"`
		MemSizeMiB int64 `json:"mem_size_mib"`
		SMT        bool  `json:"smt"`
	}
	bootSource struct {
		KernelImagePath string `json:"kernel_image_path"`
		BootArgs        string `json:"boot_args,omitempty"`
		InitrdPath      string `json:"initrd_path,omitempty"`
	}
	drive struct {
		DriveID      string `json:"drive_id"`
		PathOnHost   string `json:"path_on_host"`
		IsRootDevice bool   `json:"is_root_device"`
		IsReadOnly   bool   `json:"is_read_only"`
	}
	networkInterface struct {
		IfaceID     string `json:"iface_id"`
		HostDevName string `json:"host_dev_name"`
		GuestMAC    string `json:"guest_mac,omitempty"`
	}
	mmdsConfig struct {
		Version           string   `json:"version"`
		NetworkInterfaces []string `json:"network_interfaces"`
	}
	action struct {
		ActionType string `json:"action_type"`
	}
	vmState struct {
		State string `json:"state"`
	}
	instanceInfo struct {
		ID         string `json:"id"`
		State      string `json:"state"`
		VMMVersion string `json:"vmm_version"`
		AppName    string `json:"app_name"`
	}
)

// Action types and VM states.
const (
	actionInstanceStart  = "InstanceStart"
	actionSendCtrlAltDel = "SendCtrlAltDel"
	statePaused          = "Paused"
	stateResumed         = "Resumed"
)

// client talks to one Firecracker API socket.
type client struct {
	hc *http.Client
}

func newClient(sock string) *client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		DisableKeepAlives: true,
	}
	return &client{hc: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
}

// APIError is an error response of the Firecracker API.
type APIError struct {
	Method, Path string
	Status       int
	Fault        string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d %s", e.Method, e.Path, e.Status, e.Fault)
}

func (c *client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("firecracker %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode/100 != 2 {
		var f struct {
			FaultMessage string `json:"fault_message"`
		}
		json.Unmarshal(data, &f)
		if f.FaultMessage == "" {
			f.FaultMessage = string(bytes.TrimSpace(data))
		}
		return &APIError{Method: method, Path: path, Status: resp.StatusCode, Fault: f.FaultMessage}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("firecracker %s %s: decode reply: %w", method, path, err)
		}
	}
	return nil
}

func (c *client) put(ctx context.Context, path string, body any) error {
	return c.do(ctx, http.MethodPut, path, body, nil)
}

func (c *client) info(ctx context.Context) (instanceInfo, error) {
	var ii instanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &ii)
	return ii, err
}
