"""The in-container half of a session: a Perl driver (``perl-base`` is in every Debian image) that
keeps one bash alive and runs each command in a forked subshell of it, so a command costs a fork
(under a millisecond) instead of a ``docker exec`` (~40-90 ms) or a fresh bash (~3 ms).

Driver protocol, on the ``docker exec`` stdin/stdout of ``perl -e DRIVER DIR``:

- sandboxd -> driver: ``R <token> <timeout_ms> <cap> <keep> <len pre> <len cmd>\\n<pre><cmd>`` runs a
  command (``pre`` sets cwd and env; ``keep=1`` carries cwd and exports over to the next command);
  ``I <token>\\n`` interrupts it (SIGINT to its process group), ``K <token>\\n`` kills it.
- driver -> sandboxd: frames ``<kind> <len>\\n<data>``: ``o``/``e`` head bytes of stdout/stderr as they
  come, ``O``/``E`` their kept tail at the end, then ``x`` with
  ``<status> <timed_out> <stdout total> <stderr total> <oom kills or -1> <started>`` (started: 1 ran,
  0 could not fork, -1 could not even write the command's files: nothing was tried).

Each command is a bash job (``set -m``: its own process group) whose stdout and stderr are FIFOs made
for it alone, so output ends when every process holding them is gone (as with ``docker exec``) and
nothing a stray background process prints can leak into a later command. On timeout the driver
kills the group and every process carrying the command's ``RS_EXEC`` token (``setsid`` escapees).
The driver keeps at most ``cap/2`` bytes of tail per stream: memory is bounded whatever a command prints.
"""

# ruff: noqa: E501  (Perl source: its long lines read better whole)
from __future__ import annotations

EXECUTOR = r"""
set -m
__rs_d=$1; shift
__rs_save() {
  { printf 'cd -- %q\n' "$PWD"; export -n RS_EXEC; export -p; } >"$__rs_d/s" 2>/dev/null
}
while read -r __rs_t __rs_k; do
  (
    printf 'P %s\n' "$BASHPID" >&3
    exec 3>&-
    export RS_EXEC=$__rs_t
    if [ "$__rs_k" = 1 ]; then trap __rs_save EXIT; fi
    . "$__rs_d/p" || exit 126
    . "$__rs_d/c"
  ) </dev/null >"$__rs_d/o.$__rs_t" 2>"$__rs_d/e.$__rs_t" &
  wait "$!"
  __rs_s=$?
  if [ "$__rs_k" = 1 ] && [ -s "$__rs_d/s" ]; then . "$__rs_d/s"; : >"$__rs_d/s"; fi  # no rm: a fork
  printf 'X %s\n' "$__rs_s" >&3
done
"""

DRIVER = r"""
use strict; no warnings; use POSIX (); use Fcntl qw(O_RDONLY O_NONBLOCK); use Time::HiRes qw(time);
my $dir = shift @ARGV; my $EXECUTOR = shift @ARGV;
mkdir $dir, 0700;
binmode STDIN; binmode STDOUT;
pipe(my $cr, my $cw) or die "pipe: $!"; pipe(my $sr, my $sw) or die "pipe: $!";
my $bash = fork // die "fork: $!";
if (!$bash) {
  open(STDIN, '<&', $cr); POSIX::dup2(fileno($sw), 3);
  open(STDOUT, '>', '/dev/null'); open(STDERR, '>', '/dev/null');
  exec 'bash', '--noprofile', '--norc', '-c', $EXECUTOR, 'bash', $dir; POSIX::_exit(127);
}
close $cr; close $sw; select((select($cw), $| = 1)[0]);
my ($in, $st) = ('', '');
sub out { my $d = shift; my $o = 0; while ($o < length $d) { my $n = syswrite(STDOUT, $d, length($d) - $o, $o); exit 0 unless defined $n; $o += $n } }
sub frame { out("$_[0] " . length($_[1]) . "\n" . $_[1]) }
sub fill { my $n = sysread(STDIN, my $c, 65536); return 0 unless $n; $in .= $c; 1 }
sub line { my $i; until (($i = index($in, "\n")) >= 0) { fill() or return undef } my $l = substr($in, 0, $i + 1, ''); chop $l; $l }
sub bytes { my $n = shift; while (length($in) < $n) { fill() or return undef } substr($in, 0, $n, '') }
sub spit { my ($p, $d) = @_; open(my $f, '>', $p) or return 0; binmode $f; print $f $d or return 0; close $f }
sub sweep {
  my $needle = "\0RS_EXEC=$_[0]\0";
  for (1 .. 2) {
    opendir(my $dh, '/proc') or return;
    for my $p (grep { /^\d+$/ && $_ != $$ } readdir $dh) {
      open(my $f, '<', "/proc/$p/environ") or next; local $/; my $e = <$f>; close $f;
      kill 'KILL', $p if defined $e && index("\0$e\0", $needle) >= 0;
    }
  }
}
sub killgroup { my ($sig, $pid) = @_; return unless $pid; for (1 .. 50) { last unless kill $sig, -$pid; last if $sig ne 'KILL'; select(undef, undef, undef, 0.002) } }
sub oomcount {
  for my $p ('/sys/fs/cgroup/memory/memory.oom_control', '/sys/fs/cgroup/memory.events') {
    open(my $f, '<', $p) or next; while (<$f>) { return $1 if /^oom_kill (\d+)/ }
  }
  -1
}
sub run1 {
  my ($tok, $tmo, $cap, $keep, $pre, $cmd) = @_;
  my $t0 = time; my ($o, $e) = ("$dir/o.$tok", "$dir/e.$tok");
  -d $dir or mkdir $dir, 0700;
  unlink $o, $e;
  my ($ofh, $efh);
  unless (spit("$dir/p", $pre) && spit("$dir/c", $cmd) && POSIX::mkfifo($o, 0600) && POSIX::mkfifo($e, 0600)
      && sysopen($ofh, $o, O_RDONLY | O_NONBLOCK) && sysopen($efh, $e, O_RDONLY | O_NONBLOCK)) {
    my $why = "sandboxd session: cannot prepare the command in $dir: $!\n"; unlink $o, $e;
    frame('e', $why); frame('x', "126 0 0 " . length($why) . " -1 -1"); return;
  }
  my $hc = int($cap / 2); my $tc = $cap - $hc;
  my @s = ({fh => $ofh, k => 'o', sent => 0, tail => '', tot => 0, open => 1},
           {fh => $efh, k => 'e', sent => 0, tail => '', tot => 0, open => 1});
  print $cw "$tok $keep\n";
  my ($pid, $status, $timed, $hard, $intr) = (0, undef, 0, undef, 0);
  while (1) {
    my $now = time;
    if (!$timed && $now >= $t0 + $tmo) { $timed = 1; killgroup('KILL', $pid); sweep($tok); $hard = $now + 2 }
    if (defined $hard && $now >= $hard) { $_->{open} = 0 for @s; if ($now >= $hard + 3) { $status //= 137; last } }
    my @live = grep { $_->{open} } @s;
    last if defined $status && (!$pid || !@live);
    my $rin = ''; vec($rin, fileno(STDIN), 1) = 1; vec($rin, fileno($sr), 1) = 1;
    vec($rin, fileno($_->{fh}), 1) = 1 for @live;
    my $wait = !defined $hard ? $t0 + $tmo - $now : $now < $hard ? $hard - $now : $hard + 3 - $now;
    $wait = 0 if $wait < 0;
    my $n = select(my $rout = $rin, undef, undef, $wait);
    next if $n <= 0;
    if (vec($rout, fileno($sr), 1)) {
      my $r = sysread($sr, my $c, 4096);
      if (!$r) { $status //= 137; $pid = 0; next }
      $st .= $c;
      while ($st =~ s/^([PX]) (\d+)\n//) {
        if ($1 eq 'P') { $pid = $2; killgroup('INT', $pid) if $intr } else { $status = $2 }
      }
    }
    if (vec($rout, fileno(STDIN), 1)) {
      unless (fill()) { killgroup('KILL', $pid); sweep($tok); exit 0 }
      while ($in =~ /^([IK]) (\w+)\n/) {
        my ($what, $who) = ($1, $2); $in =~ s/^[^\n]*\n//;
        next unless $who eq $tok;
        if ($what eq 'I') { $intr = 1; killgroup('INT', $pid) } else { killgroup('KILL', $pid); sweep($tok) }
      }
    }
    for my $x (@live) {
      next unless vec($rout, fileno($x->{fh}), 1);
      my $r = sysread($x->{fh}, my $buf, 65536);
      next unless defined $r;
      if ($r == 0) { $x->{open} = 0; next }
      $x->{tot} += $r;
      if ($x->{sent} < $hc) {
        my $take = $hc - $x->{sent}; $take = $r if $take > $r;
        frame($x->{k}, substr($buf, 0, $take)); $x->{sent} += $take; substr($buf, 0, $take, '');
      }
      if (length $buf && $tc) {
        $x->{tail} .= $buf; my $over = length($x->{tail}) - $tc;
        substr($x->{tail}, 0, $over, '') if $over > 0;
      }
    }
  }
  close $_->{fh} for @s; unlink $o, $e;
  for my $x (@s) { frame(uc $x->{k}, $x->{tail}) if length $x->{tail} }
  my $oom = ($status == 137 && !$timed) ? oomcount() : -1;
  frame('x', join(' ', $status, $timed, $s[0]{tot}, $s[1]{tot}, $oom, $pid ? 1 : 0));
}
while (defined(my $l = line())) {
  my ($r, $tok, $ms, $cap, $keep, $np, $nc) = split / /, $l;
  next unless $r eq 'R' && $tok =~ /^\w+$/;
  my $pre = bytes($np); my $cmd = bytes($nc);
  last unless defined $cmd;
  run1($tok, $ms / 1000, $cap, $keep, $pre, $cmd);
}
close $cw; waitpid $bash, 0;
"""
