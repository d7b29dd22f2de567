module faktory-gateway/tests/clients/go

go 1.25

require github.com/contribsys/faktory v1.9.4
