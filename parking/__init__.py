"""Car-park metering: camera events in, one stay summary per visit out."""
