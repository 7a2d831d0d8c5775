"""File formats: NeXus (NXtomo raw scans, processed volumes) and the SWMR HDF5 frame writer shared
by the simulated detectors and the detector IOC. No Prefect, no catalog, no devices."""
