package guestproc

import (
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	tail := " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 20 21 22\n"
	for _, c := range []struct {
		in    string
		state byte
		start uint64
		bad   bool
	}{
		{in: "123 (sleep) S" + tail, state: 'S', start: 4242},
		{in: "123 (a b) c)) T" + tail, state: 'T', start: 4242},
		{in: "1 ()) Z" + tail, state: 'Z', start: 4242},
		{in: "", bad: true},
		{in: "123 (sleep S 1 2", bad: true},
		{in: "123 (sleep) S 1 2 3", bad: true},
		{in: "123 (sleep) SS" + tail, bad: true},
		{in: "123 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 -1 20", bad: true},
	} {
		st, err := ParseStat([]byte(c.in))
		if c.bad {
			if err == nil {
				t.Errorf("ParseStat(%q) = %+v, want error", c.in, st)
			}
			continue
		}
		if err != nil || st.State != c.state || st.StartTime != c.start {
			t.Errorf("ParseStat(%q) = %+v, %v; want %c %d", c.in, st, err, c.state, c.start)
		}
	}
}

func TestReadStatSelf(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil || st.StartTime == 0 || st.Dead() {
		t.Fatalf("ReadStat(self) = %+v, %v", st, err)
	}
	if _, err := LiveStat(os.Getpid(), st.StartTime+1); err != ErrGone {
		t.Errorf("LiveStat with wrong start time = %v, want ErrGone", err)
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte("123 (sleep) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 20\n"))
	f.Add([]byte("1 ()) Z"))
	f.Add([]byte(")"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseStat(b)
		if err == nil && st.State == 0 && len(b) == 0 {
			t.Fatal("empty input parsed")
		}
	})
}

// reap collects an exited child without a thread blocked in wait.
func TestReapCollectsZombie(t *testing.T) {
	cmd := exec.Command("sleep", "0.05")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	Reap(cmd.Process)
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := ReadStat(pid)
		if err != nil {
			return // gone: reaped
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %d not reaped (state %c)", pid, st.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
