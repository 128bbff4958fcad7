# vssd.toml(5) from the commented example configuration (packaging/vssd.toml): the file's first
# comment block is the description, each `# --- Title ---` line a subsection, each key (also a
# commented-out one, `# key = value`) an entry whose text is the comment block above it. Keys
# that follow each other with no comment between share that text. One source for the example
# and the manual, so they cannot disagree.
#   awk -v version=0.1.0 -f vssd.toml.5.awk vssd.toml > vssd.toml.5

function esc(s) {
  gsub(/\\/, "\\e", s)
  gsub(/-/, "\\-", s)
  if (s ~ /^[.']/) s = "\\&" s
  return s
}
# Prose: backslashes escaped, a leading dot or quote made literal.
function prose(s) {
  gsub(/\\/, "\\e", s)
  if (s ~ /^[.']/) s = "\\&" s
  return s
}
function flush_keys(   i) {
  if (nkeys == 0) return
  for (i = 1; i <= nkeys; i++) {
    print ".TP"
    if (i < nkeys) print ".PD 0"
    print keys[i]
  }
  print ".PD"
  printf "%s", text
  nkeys = 0
  text = ""
}

BEGIN {
  print ".TH VSSD.TOML 5 \"\" \"vssd " version "\" \"File Formats\""
  print ".SH NAME"
  print "vssd.toml \\- configuration of the vssd guest agent"
  print ".SH SYNOPSIS"
  print ".B /etc/vssd/vssd.toml"
  print ".SH DESCRIPTION"
  in_header = 1
}

in_header {
  if ($0 ~ /^#/) {
    line = $0; sub(/^# ?/, "", line); sub(/^\/etc\/vssd\/vssd.toml — /, "", line)
    print prose(line)
    next
  }
  in_header = 0
  print ".PP"
  print "The file is TOML. The package installs it with every key at its built\\-in default, so"
  print "an unchanged file and no file behave the same; a key left out takes the default shown."
  print ".SH KEYS"
}

/^# --- .* ---$/ {
  flush_keys(); pending = ""
  t = $0; sub(/^# --- /, "", t); sub(/ ---$/, "", t)
  print ".SS \"" t "\""
  next
}

# A key, set or commented out.
/^(# )?[a-z][a-z0-9-]* = / {
  commented = ($0 ~ /^# /)
  k = $0; sub(/^# /, "", k)
  if (nkeys == 0) { text = pending; pending = "" }
  else if (pending != "") { flush_keys(); text = pending; pending = "" }
  keys[++nkeys] = "\\fB" esc(k) "\\fR" (commented ? " (not set in the installed file)" : "")
  next
}

/^#/ {
  if (nkeys > 0) flush_keys()
  line = $0; sub(/^# ?/, "", line)
  pending = pending prose(line) "\n"
  next
}

/^[ \t]*$/ {
  flush_keys()
  if (pending != "") { print ".PP"; printf "%s", pending; pending = "" }
  next
}

END {
  flush_keys()
  print ".SH FILES"
  print ".TP"
  print ".B /etc/vssd/vssd.toml"
  print "This file."
  print ".TP"
  print ".B /etc/vssd/hooks.d/"
  print "Hook executables, run at each freeze and thaw."
  print ".TP"
  print ".B /run/vssd/"
  print "The state directory: freeze marker, control socket, app socket."
  print ".SH \"SEE ALSO\""
  print ".BR vssd (8),"
  print ".BR vssctl (8),"
  print ".BR appvss (1)"
}
