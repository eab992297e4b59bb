#!/usr/bin/perl
# The original's reading of node.conf, for the differential test of our parser
# (tests/unit/test_properties_perl.py). Reads requests "ENCODING<TAB>PATH" on stdin, one
# a line; answers each with one JSON line: {"error": MESSAGE} when Config::Properties
# refuses the file, else {"values": {KEY: VALUE}, "expanded": {KEY: VALUE or null}}, where
# "expanded" is each value after the HKD's ${key} expansion (null: the expansion died).
use strict;
use warnings;
use Config::Properties;
use JSON::PP;

$| = 1;
my $json = JSON::PP->new->ascii->canonical;

while (my $request = <STDIN>) {
    chomp $request;
    my ($encoding, $path) = split /\t/, $request, 2;
    my $props = Config::Properties->new(encoding => $encoding);
    open my $fh, '<', $path or die "cannot open $path: $!";
    my %answer;
    if (eval { $props->load($fh); 1 }) {
        my %values = $props->properties;
        my %expanded = map { $_ => scalar eval { expand($props, $_, 0) } } keys %values;
        %answer = (values => \%values, expanded => \%expanded);
    }
    else {
        %answer = (error => "$@");
    }
    close $fh;
    print $json->encode(\%answer), "\n";
}

# As the HKD reads a key: ${NAME} becomes NAME's (expanded) value, ${{} a literal ${,
# and a missing key dies. The depth limit stands in for the original's endless recursion.
sub expand {
    my ($props, $key, $depth) = @_;
    die "reference loop\n" if $depth > 40;
    my $value = $props->getProperty($key);
    defined $value or die "configuration entry $key missing\n";
    $value =~ s/\$\{(.*?)\}/$1 eq '{' ? '${' : expand($props, $1, $depth + 1)/ge;
    return $value;
}
