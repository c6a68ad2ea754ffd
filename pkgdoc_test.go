// Package metald_test holds repository-wide checks.
package metald_test

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every package has one package doc comment whose first sentence says what
// the package is: "Package <name> ...", or "Command <name> ..." for mains.
func TestPackageDocs(t *testing.T) {
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		if strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "build" || path == filepath.Join("internal", "gen") || strings.HasPrefix(path, filepath.Join("internal", "gen")+string(filepath.Separator)) {
			if path != "." {
				return filepath.SkipDir
			}
		}
		fset := token.NewFileSet()
		pkgs, err := parser.ParseDir(fset, path, func(fi os.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, parser.ParseComments|parser.PackageClauseOnly)
		if err != nil {
			return err
		}
		for name, pkg := range pkgs {
			var docs []string
			for _, f := range pkg.Files {
				if f.Doc != nil {
					docs = append(docs, f.Doc.Text())
				}
			}
			want := "Package " + name + " "
			if name == "main" {
				want = "Command " + filepath.Base(path) + " "
			}
			switch {
			case len(docs) == 0:
				t.Errorf("%s: package %s has no doc comment", path, name)
			case len(docs) > 1:
				t.Errorf("%s: package %s has %d doc comments, want one", path, name, len(docs))
			case !strings.HasPrefix(docs[0], want):
				t.Errorf("%s: doc comment starts %q, want %q", path, strings.SplitN(docs[0], "\n", 2)[0], want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
