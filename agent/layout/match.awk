# Input 1: vssd.order, "KEY<TAB>MANGLED" per function ('#' comments). Input 2: the same for each
# function of the objects being linked. Output: "POSITION MANGLED" for each function to place,
# POSITION being its entry's number in the order. With -v summary=FILE, one line of counts there.
#
# An entry matches by its mangled name. When that is gone (the crate hashes in it change with the
# compiler, a dependency's version, the feature set: a workspace build unifies features unlike
# `-p vssd`), it matches by KEY, the demangled name without hashes (`key`), but only a function
# whose key no other function of the objects has: a generic's instantiations can share a key
# (legacy names hide the type), and placing all of them would fill the hot pages with cold code.
BEGIN { FS = "\t" }
FNR == NR {
  if ($0 ~ /^#/ || $0 == "" || NF != 2) next
  np++
  if (!($2 in mpos)) mpos[$2] = np
  if (!($1 in kpos)) kpos[$1] = np
  entries[$1]++
  next
}
NF == 2 {
  n++; key[n] = $1; sym[n] = $2; nkey[$1]++
  if ($2 in mpos) exactk[$1]++
}
END {
  for (i = 1; i <= n; i++) {
    if (sym[i] in mpos) { print mpos[sym[i]], sym[i]; exact++; continue }
    k = key[i]
    if ((k in kpos) && nkey[k] == 1 && exactk[k] + 0 < entries[k]) { print kpos[k], sym[i]; bykey++ }
  }
  if (summary == "") exit
  line = sprintf("%d entries: %d found by mangled name, %d by key", np, exact + 0, bykey + 0)
  if (exact + bykey < np * 0.9) line = line "; the order is stale: sudo agent/layout/profile --bin target/release/vssd"
  print line > summary
}
